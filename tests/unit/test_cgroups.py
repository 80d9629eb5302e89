"""One cgroup per worker, with a memory limit (issue #34), against a fake cgroupfs in a directory:
what is written where, when the resident divides its unit's cgroup and when it says it cannot."""

from __future__ import annotations

import logging
import os
import selectors
from pathlib import Path
from typing import Any

import pytest

from tests.support.victim import make_victim, snapshot
from zoo_agent.resident.cgroups import RUNTIME_SLACK, WorkerCgroups, limit_for
from zoo_agent.resident.config import ResidentConfig, WorkerConfig
from zoo_agent.resident.slots import Slot
from zoo_agent.resident.workers import Workers

UNIT = "system.slice/model-zoo-resident.service"


def _fs(tmp_path: Path, *, own: str = f"0::/{UNIT}\n", controllers: str = "cpu io memory pids") -> tuple[Path, Path]:
    """A cgroup v2 mount with the resident's unit cgroup, and /proc/self/cgroup saying we are in it."""
    fs = tmp_path / "cgroup"
    (fs / UNIT).mkdir(parents=True)
    (fs / "cgroup.controllers").write_text(controllers + "\n")
    (fs / UNIT / "cgroup.controllers").write_text(controllers + "\n")
    (fs / UNIT / "cgroup.subtree_control").write_text("")
    (tmp_path / "self-cgroup").write_text(own)
    return fs, tmp_path / "self-cgroup"


def _yes(_: Path) -> bool:
    return True


def test_a_delegated_unit_is_divided_the_supervisor_in_its_own_leaf_and_memory_enabled_below(tmp_path: Path, caplog: Any) -> None:
    fs, own = _fs(tmp_path)
    caplog.set_level(logging.INFO, "zoo_agent.resident")
    cgroups = WorkerCgroups.detect(fs, own, delegated=_yes)
    assert cgroups.unit == fs / UNIT
    assert (fs / UNIT / "supervisor" / "cgroup.procs").read_text() == str(os.getpid())
    assert (fs / UNIT / "cgroup.subtree_control").read_text() == "+memory"
    path = cgroups.place(4242, "chat", limit_for(2 << 30))
    assert path == fs / UNIT / "worker-chat-4242"
    assert (path / "memory.max").read_text() == str(int((2 << 30) * 1.25) + RUNTIME_SLACK)
    assert (path / "memory.swap.max").read_text() == "0" and (path / "memory.oom.group").read_text() == "1"
    assert (path / "cgroup.procs").read_text() == "4242"
    assert "memory limit 3.8 GB" in caplog.text


@pytest.mark.parametrize(("own", "controllers", "delegated", "why"), [
    ("0::/user.slice/session-1.scope\n", "memory", False, "is not delegated to the resident (run as a systemd unit's main process with Delegate=memory)"),
    ("12:memory:/x\n0::/x\n", "memory", True, "cgroup v2 alone is not mounted at /sys/fs/cgroup"),  # hybrid: memory is v1's
    (f"0::/{UNIT}\n", "cpu pids", True, "the memory controller is not available in"),
    ("0::/../../etc\n", "memory", True, "is not a cgroup path"),
])  # fmt: skip
def test_anywhere_else_workers_run_without_limits_and_it_is_said_once(tmp_path: Path, caplog: Any, own: str, controllers: str,
                                                                      delegated: bool, why: str) -> None:  # fmt: skip
    fs, own_file = _fs(tmp_path, own=own, controllers=controllers)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    caplog.set_level(logging.INFO, "zoo_agent.resident")
    cgroups = WorkerCgroups.detect(fs, own_file, delegated=lambda _: delegated)
    assert cgroups.unit is None and why in cgroups.why_not
    assert cgroups.place(4242, "chat", 1 << 30) is None
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # nothing written
    said = [r.getMessage() for r in caplog.records if "without memory limits" in r.getMessage()]
    assert len(said) == 1 and why in said[0]


def test_a_process_systemd_did_not_start_never_divides_its_cgroup(tmp_path: Path) -> None:
    """A resident a test or a shell started (its parent is not PID 1) leaves whatever cgroup it is in alone,
    even one delegated to its user: it is not that unit's main process."""
    fs, own = _fs(tmp_path)
    assert WorkerCgroups.detect(fs, own).unit is None
    assert not (fs / UNIT / "supervisor").exists()


class _Process:
    """A worker process that exits when told (``code``)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.path, self.code = pid, f"{pid}.sock", None

    def fileno(self) -> None:
        return None

    def read(self) -> list[Any]:
        return []

    def poll(self) -> int | None:
        return self.code

    def close(self) -> None:
        pass


class _Launch:
    def __init__(self) -> None:
        self.pids = iter(range(5000, 5100))

    def spawn(self, config: WorkerConfig, *, standby: bool = False) -> _Process:
        return _Process(next(self.pids))


def test_a_worker_past_its_limit_is_reported_as_oom_naming_its_tenant_and_limit_and_its_cgroup_goes(tmp_path: Path, caplog: Any) -> None:
    fs, own = _fs(tmp_path)
    cgroups = WorkerCgroups.detect(fs, own, delegated=_yes)
    config = ResidentConfig(root=tmp_path / "zoo", index=tmp_path / "index.json", host="h")
    workers = Workers(config, _Launch(), selectors.DefaultSelector(), lambda *_: None, lambda: None, cgroups=cgroups)  # type: ignore[arg-type]
    slots = {t: Slot(t, estimate=1 << 30) for t in ("chat", "code")}
    for slot in slots.values():
        workers.start(None, slot, WorkerConfig(tenant=slot.tenant, model="m", version="v1", version_dir=tmp_path))  # type: ignore[arg-type]
    chat, code = slots["chat"].serving, slots["code"].serving
    assert chat is not None and code is not None and chat.cgroup is not None and code.cgroup is not None and chat.cgroup != code.cgroup
    chat.state = "serving"
    (chat.cgroup / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 1\n")
    chat.process.code = -9  # type: ignore[attr-defined]
    caplog.set_level(logging.INFO, "zoo_agent.resident")
    workers.closed(slots["chat"], chat)
    assert chat.killed_for == "oom" and "outgrew its memory limit of 2.4 GB (memory.max)" in chat.error
    assert "worker 5000 (chat): killed by the kernel: it outgrew its memory limit of 2.4 GB" in caplog.text
    (chat.cgroup / "memory.events").unlink()
    for name in list(chat.cgroup.iterdir()):
        name.unlink()  # what the kernel's cgroupfs does when the last process is gone
    workers.closed(slots["chat"], chat)
    assert not chat.cgroup.exists() and code.cgroup.exists() and code.killed_for == ""


def test_a_cgroup_path_that_climbs_out_of_the_mount_divides_nothing(tmp_path: Path) -> None:
    """/proc/self/cgroup is the kernel's word, but a path with '..' (a bind-mounted fake, a bug) must not
    lead the supervisor to write outside the cgroup mount: a victim beside it is unchanged."""
    victim = make_victim(tmp_path / "victim")
    before = snapshot(victim)
    fs, own = _fs(tmp_path, own="0::/../victim\n")
    cgroups = WorkerCgroups.detect(fs, own, delegated=_yes)
    assert cgroups.unit is None and cgroups.place(7, "chat", 1 << 30) is None
    assert snapshot(victim) == before
