"""One cgroup per worker, with a memory limit (issue #34).

Every worker used to run in the resident's one cgroup: one that grew past its estimate took
memory from its neighbours until the kernel's OOM killer chose a victim, maybe the supervisor.
Under systemd with ``Delegate=memory`` on the resident's unit (cgroup v2), the unit's cgroup is
the resident's to divide (systemd's delegation rules): the supervisor moves itself into
``supervisor/`` (a cgroup that enables controllers below it holds no process), enables the
memory controller below the unit, and starts each worker in ``worker-<tenant>-<pid>/`` with
``memory.max`` = its footprint plus ``limit_for``'s slack, no swap, and ``memory.oom.group``:
a worker that outgrows its limit is killed alone, with all its processes, and the supervisor
restarts it as for any crash (``zoo:worker_restarts_total{reason="oom"}``).

Delegation rather than transient scopes over D-Bus: the resident runs as its own user, which
may not start system units without a polkit rule, and a scope outlives the unit that asked for
it unless bound to it; a delegated subtree is the unit's own, stopped with it, and needs one line
(``Delegate=``) and no new socket in the sandbox.

Anywhere else (no systemd, cgroup v1 or a hybrid host, a unit without delegation) the same code
runs without limits and says why once, at start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from zoo_agent.formats import human_bytes

__all__ = ["RUNTIME_SLACK", "SLACK_FRACTION", "WorkerCgroups", "limit_for"]

log = logging.getLogger("zoo_agent.resident")

#: What a worker's limit adds to its model's footprint: a quarter of it (a load's transient copies,
#: allocator arenas) and 1 GiB for its runtime (Python, torch and the HTTP stack: 370 MB of RSS on
#: CPU here before any weights; a CUDA context on a GPU host). Measured (``bench/memory.py``, docs/paging.md's
#: table): a worker's peak RSS under max_batch near-full prompts was at most 516 MB over its estimate on CPU
#: (transformers, a Qwen2-0.5B shape at 2 x 1,004 tokens), a third of the slack this gives it.
SLACK_FRACTION = 0.25
RUNTIME_SLACK = 1 << 30


def limit_for(footprint: int) -> int:
    """``memory.max`` for a worker whose model counts ``footprint`` bytes."""
    return int(footprint * (1 + SLACK_FRACTION)) + RUNTIME_SLACK


class WorkerCgroups:
    """The unit's delegated cgroup, divided per worker; ``unit`` None: no limits, ``why_not`` says why."""

    def __init__(self, unit: Path | None, why_not: str = "") -> None:
        self.unit, self.why_not = unit, why_not

    @classmethod
    def detect(cls, fs: Path = Path("/sys/fs/cgroup"), own: Path = Path("/proc/self/cgroup"),
               delegated: Callable[[Path], bool] | None = None) -> WorkerCgroups:  # fmt: skip
        """Ours to divide, made ready (the supervisor moved into ``supervisor/``, memory enabled below
        the unit); or not, saying why once. ``delegated``: how delegation is told (a unit test's fake)."""
        cgroups = cls._delegated(fs, own, delegated or _delegated_to_us)
        if cgroups.unit is None:
            log.info("workers run in the resident's own cgroup, without memory limits: %s", cgroups.why_not)
        else:
            log.info("each worker runs in a cgroup of its own under %s, with a memory limit", cgroups.unit)
        return cgroups

    @classmethod
    def _delegated(cls, fs: Path, own: Path, delegated: Callable[[Path], bool]) -> WorkerCgroups:
        try:
            lines = own.read_text(encoding="ascii", errors="replace").splitlines()
        except OSError as exc:
            return cls(None, f"{own} is unreadable ({exc.strerror})")
        paths = [line.split(":", 2)[2] for line in lines if line.startswith("0::")]
        if not paths or len(lines) > 1 or not (fs / "cgroup.controllers").is_file():
            return cls(None, "cgroup v2 alone is not mounted at /sys/fs/cgroup (cgroup v1 or a hybrid hierarchy)")
        unit = fs / paths[0].strip().lstrip("/")
        if ".." in Path(paths[0].strip()).parts:
            return cls(None, f"{paths[0].strip()!r} is not a cgroup path")
        if unit.name == "supervisor":
            unit = unit.parent  # moved already (a resident started again in the same unit's cgroup)
        if not delegated(unit):
            return cls(None, f"{unit} is not delegated to the resident (run as a systemd unit's main process with Delegate=memory)")
        try:
            if "memory" not in (unit / "cgroup.controllers").read_text(encoding="ascii").split():
                return cls(None, f"the memory controller is not available in {unit}")
            (unit / "supervisor").mkdir(exist_ok=True)
            (unit / "supervisor" / "cgroup.procs").write_text(str(os.getpid()), encoding="ascii")
            (unit / "cgroup.subtree_control").write_text("+memory", encoding="ascii")
        except OSError as exc:
            return cls(None, f"cannot divide {unit}: {exc.strerror or exc}")
        return cls(unit)

    def place(self, pid: int, tenant: str, limit: int) -> Path | None:
        """Move the worker ``pid`` (just started) into a cgroup of its own limited to ``limit`` bytes;
        None when there is none to make (it runs without a limit), or no process to move (pid 0: its
        start failed; written to cgroup.procs, 0 would move the supervisor itself)."""
        if self.unit is None or pid <= 0:
            return None
        path = self.unit / f"worker-{tenant}-{pid}"
        try:
            path.mkdir()
            (path / "memory.max").write_text(str(limit), encoding="ascii")
            for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                try:  # no swap accounting, an older kernel: the limit holds without them
                    (path / name).write_text(value, encoding="ascii")
                except OSError:
                    pass
            (path / "cgroup.procs").write_text(str(pid), encoding="ascii")
        except OSError as exc:
            log.warning("worker %d (%s): runs without a memory limit: cannot make %s (%s)", pid, tenant, path, exc.strerror or exc)
            self.remove(path)
            return None
        log.info("worker %d (%s): memory limit %s (memory.max)", pid, tenant, human_bytes(limit))
        return path

    @staticmethod
    def oom_kills(path: Path) -> int:
        """How often the kernel killed in ``path`` for its limit (``memory.events``' ``oom_kill``)."""
        try:
            text = (path / "memory.events").read_text(encoding="ascii", errors="replace")[:4096]
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return 0

    @staticmethod
    def limit(path: Path) -> int | None:
        try:
            text = (path / "memory.max").read_text(encoding="ascii").strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    @staticmethod
    def remove(path: Path) -> None:
        """Its processes gone, the cgroup goes too."""
        try:
            path.rmdir()
        except OSError:
            pass


def _delegated_to_us(unit: Path) -> bool:
    """We are a unit's main process (systemd started us: our parent is PID 1 and we have its
    ``INVOCATION_ID``; a resident a test or a shell started is not, whatever its cgroup), and systemd
    handed the unit's cgroup over: it chowns it to the unit's user and marks it (``user.delegate``,
    ``trusted.delegate``). A cgroup systemd still manages is never divided."""
    if os.getppid() != 1 or not os.environ.get("INVOCATION_ID"):
        return False
    for name in ("user.delegate", "trusted.delegate"):
        try:
            if os.getxattr(unit, name) == b"1":
                return True
        except OSError:
            pass
    try:
        return os.geteuid() != 0 and os.stat(unit).st_uid == os.geteuid() and os.access(unit / "cgroup.subtree_control", os.W_OK)
    except OSError:
        return False
