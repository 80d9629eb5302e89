"""The zoo on disk with real files: publish, no-op, swap, rollback, immutability, gc (issue #3)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.world import World
from zoo_agent.store import zoo as store


def test_apply_publishes_verified_version_with_manifest(world: World) -> None:
    world.artifact("m", "v1", {"config.json": b"{}", "sub/weights.safetensors": b"w" * 5000})
    result = world.run("apply")
    assert result.exit_code == 0, result.output
    vdir = world.root / "models/m/versions/v1"
    assert world.current("m") == "v1"
    assert (vdir / "sub/weights.safetensors").read_bytes() == b"w" * 5000
    assert (vdir / "config.json").stat().st_mode & 0o777 == 0o440  # read-only, group-readable, nothing for others
    manifest = json.loads((vdir / "manifest.json").read_text())
    assert manifest["version"] == "v1" and manifest["source"]["type"] == "file"
    assert [f["path"] for f in manifest["files"]] == ["config.json", "sub/weights.safetensors"]
    assert all({"sha256", "size", "mtime_ns", "ino"} <= set(f) for f in manifest["files"])
    log = [json.loads(line) for line in (world.root / "host/actions.jsonl").read_text().splitlines()]
    assert [(r["action"], r["result"]) for r in log] == [("fetch", "ok"), ("publish", "ok"), ("swap-current", "ok")]
    assert log[0]["bytes"] == 5002 and {"time", "duration_s", "version", "id"} <= set(log[0])
    assert not list(world.root.rglob("*.tmp*"))


def test_noop_apply_reads_no_content_and_needs_no_source(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.artifact("m", "v1", {"a": b"a" * 100})
    assert world.run("apply").exit_code == 0
    before = world.tree()
    shutil.rmtree(world.tmp / "src")  # a no-op must not touch the source at all

    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("a no-op apply hashed a file")

    monkeypatch.setattr(store, "hash_file", forbidden)
    result = world.run("apply", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"host": "h", "root": str(world.root), "ok": True, "steps": []}
    after = world.tree()
    assert after.pop("host/actions.jsonl") == before.pop("host/actions.jsonl")
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


def test_new_version_swaps_and_keeps_previous_then_rollback(world: World) -> None:
    world.artifact("m", "v1", {"a": b"one"})
    assert world.run("apply").exit_code == 0
    world.artifact("m", "v2", {"a": b"two"})
    plan = world.run("plan")
    assert plan.stdout.splitlines() == [
        "would fetch model m v2 (1 files, 3 B)", "would publish model m v2", "would switch model m v2 to current (was v1)",
    ]
    assert world.run("apply").exit_code == 0
    assert (world.current("m"), os.readlink(world.root / "models/m/previous")) == ("v2", "versions/v1")
    result = world.run("rollback", "m")
    assert result.exit_code == 0, result.output
    assert world.current("m") == "v1"
    assert (world.root / "models/m/current/a").read_bytes() == b"one"
    assert world.run("plan").stdout.splitlines() == ["would switch model m v2 to current (was v1)"]


def test_rollback_without_previous_changes_nothing(world: World) -> None:
    world.artifact("m", "v1", {"a": b"one"})
    world.run("apply")
    before = world.tree()
    result = world.run("rollback", "m")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"{world.root / 'models/m'}: no previous version to roll back to"
    assert world.tree() == before


def test_published_version_is_immutable(world: World) -> None:
    world.artifact("m", "v1", {"a": b"one"})
    world.run("apply")
    before = world.tree()
    world.artifact("m", "v1", {"a": b"ONE"})  # same label, other bytes
    result = world.run("apply")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"{world.index}: /models/m/version: cannot publish model m v1: it is already published with other files (a); "
        "published versions are immutable: bump the version"
    )
    assert world.tree() == before


@pytest.mark.parametrize("damage", ["bit-flip", "truncate", "same-size", "longer"])
def test_corrupt_source_is_refused_before_publish(world: World, damage: str) -> None:
    world.artifact("m", "v1", {"a": b"good" * 1000})
    world.run("apply")
    world.artifact("m", "v2", {"a": b"next" * 1000})
    path = world.source_dir("m", "v2") / "a"
    data = bytearray(path.read_bytes())
    if damage == "bit-flip":
        data[1234] ^= 0x01
    elif damage == "truncate":
        del data[-1:]
    elif damage == "same-size":
        data = bytearray(b"evil" * 1000)
    else:
        data += b"x"
    path.write_bytes(bytes(data))
    result = world.run("apply")
    assert result.exit_code == 1
    expected = {"bit-flip": "sha256 ", "truncate": "size 3999, expected 4000", "same-size": "sha256 ", "longer": "larger than the declared 4000 bytes"}
    assert expected[damage] in result.stderr
    assert "Traceback" not in result.output
    assert sorted(os.listdir(world.root / "models/m/versions")) == ["v1"]  # nothing published, no staging left
    assert world.current("m") == "v1"


def test_verify_finds_and_repair_fixes_a_damaged_published_file(world: World) -> None:
    world.artifact("m", "v1", {"a": b"x" * 4096, "b": b"y" * 10})
    world.run("apply")
    target = world.root / "models/m/versions/v1/a"
    target.chmod(0o644)
    with open(target, "r+b") as f:  # flip one bit in place, as a failing disk would
        f.seek(100)
        f.write(b"X")
    result = world.run("verify")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"{target}: expected sha256 ")
    assert "verified 2 files" in result.stdout and "1 bad" in result.stdout
    repaired = world.run("verify", "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert target.read_bytes() == b"x" * 4096
    assert len(list((world.root / "quarantine/models/m").iterdir())) == 1
    assert world.run("verify").exit_code == 0


def test_touched_file_is_reverified_and_changed_file_is_refused(world: World) -> None:
    world.artifact("m", "v1", {"a": b"x" * 100})
    world.run("apply")
    target = world.root / "models/m/versions/v1/a"
    os.utime(target, ns=(1, 1))
    assert "would re-verify model m v1: changed on disk: a (rewritten)" in world.run("plan").stdout
    assert world.run("apply").exit_code == 0
    assert "would" not in world.run("plan").stdout  # manifest refreshed: trusted again
    target.chmod(0o644)
    target.write_bytes(b"z" * 100)
    result = world.run("apply")
    assert result.exit_code == 1
    assert "run: zoo-agent verify --repair m" in result.stderr
    status = world.run("status", "--json")
    assert json.loads(status.stdout)["artifacts"][0]["state"] == "drifted: a (rewritten)"


def test_mode_and_owner_drift_is_reverified_then_fixed(world: World) -> None:
    """Files another user wrote or opened up are not trusted silently: re-hashed, then made ours again."""
    world.artifact("m", "v1", {"a": b"x" * 100, "b": b"y" * 10})
    assert world.run("apply").exit_code == 0
    vdir = world.root / "models/m/versions/v1"
    (vdir / "a").chmod(0o666)
    os.chown(vdir / "b", 4242, 4242)
    plan_out = world.run("plan").stdout
    assert "would re-verify model m v1: changed on disk: a (mode 666), b (owner 4242, was 0)" in plan_out
    result = world.run("apply")
    assert result.exit_code == 0 and "re-verifying model m v1" in result.stderr
    for name in ("a", "b"):
        st = (vdir / name).stat()
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o440, 0, 0)
    assert "would" not in world.run("plan").stdout


def test_gc_respects_retention_and_removes_undeclared(world: World) -> None:
    world.available = ["other"]
    world.artifact("other", "o1", {"a": b"o"})
    for v in ("v1", "v2", "v3"):
        world.artifact("m", v, {"a": v.encode()})
        assert world.run("apply").exit_code == 0
    dry = world.run("gc", "--dry-run")
    assert "would remove model m v1 (beyond retention (2))" in dry.stdout
    world.available = []
    world.write_index()
    before = world.tree()
    assert world.run("gc", "--dry-run").exit_code == 0 and world.tree() == before
    result = world.run("gc")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(world.root / "models/m/versions")) == ["v2", "v3"]
    assert not (world.root / "models/other").exists()
    assert (world.current("m"), os.readlink(world.root / "models/m/previous")) == ("v3", "versions/v2")


def test_gc_never_removes_what_the_resident_uses(world: World) -> None:
    world.keep_versions = 1
    for v in ("v1", "v2"):
        world.artifact("m", v, {"a": v.encode()})
        world.run("apply")
    info = world.root / "resident/tenants/t/model-info.json"
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"model": "m", "version": "v1"}))
    assert world.run("gc").exit_code == 0
    assert sorted(os.listdir(world.root / "models/m/versions")) == ["v1", "v2"]


def test_gc_never_removes_the_adapter_versions_the_resident_serves(world: World) -> None:
    """What the resident writes (its own model-info.json writer, not a hand-made file) is what gc
    reads: the adapter version a worker serves is kept beyond retention, until the worker swaps
    to the new one in place; then the old one is no longer in use, and goes."""
    pytest.importorskip("prometheus_client", reason="the resident extra is not installed (pip install -e .[resident])")
    from zoo_agent.resident.wire import control as p
    from zoo_agent.resident.config import ResidentConfig
    from zoo_agent.resident.process import ZooWorkerProcess
    from zoo_agent.resident.slots import Worker
    from zoo_agent.resident.supervisor import Supervisor

    world.keep_versions = 1
    world.artifact("m", "v1", {"config.json": b"{}"})
    world.artifact("r", "l1", {"adapter_model.safetensors": b"l1"}, kind="loras")
    assert world.run("apply").exit_code == 0
    sup = Supervisor(ResidentConfig(root=world.root, index=world.index, host="h"))
    ours, theirs = socket.socketpair()
    try:
        idx = sup.load_index()
        sup.take_index(idx)
        slot = sup.slots["t"]
        worker = Worker(ZooWorkerProcess(subprocess.Popen(["true"]), "unused.sock", ours), sup.launcher.worker_config(idx, "t"))
        worker.ready = p.Ready(pid=worker.pid, load_seconds=0.1, device="cpu", dtype="float32")
        slot.serving = worker
        sup.reports.loaded(slot, worker, worker.ready)
        sup.reports.serving(slot)
        world.artifact("r", "l2", {"adapter_model.safetensors": b"l2"}, kind="loras")
        world.artifact("r", "l3", {"adapter_model.safetensors": b"l3"}, kind="loras")
        assert world.run("apply").exit_code == 0
        assert world.run("gc").exit_code == 0
        assert sorted(os.listdir(world.root / "loras/r/versions")) == ["l1", "l3"]  # l1: in use; l2: neither in use nor kept
        sup.reload.follow_adapters(slot, worker)  # the resident follows `current` to l3, in place
        assert p.to_worker(theirs.recv(65536).splitlines()[0]).type == "adapters"
        assert world.run("gc").exit_code == 0
        assert sorted(os.listdir(world.root / "loras/r/versions")) == ["l3"]
    finally:
        worker.process.wait()
        ours.close()
        theirs.close()
        sup.waker.close()
        sup.selector.close()


def test_status_reports_declared_current_previous_and_state(world: World) -> None:
    world.artifact("m", "v1", {"a": b"1"})
    world.artifact("r", "l1", {"adapter_model.safetensors": b"l"}, kind="loras")
    result = world.run("status", "--json")
    assert result.exit_code == 1  # declared but missing: not healthy, with or without --json
    assert json.loads(result.stdout)["ok"] is False
    rows = {r["id"]: r for r in json.loads(result.stdout)["artifacts"]}
    assert rows["m"]["state"] == "missing" and rows["r"]["declared"] == "l1"
    assert world.run("status").exit_code == 1
    world.run("apply")
    result = world.run("status", "--json")
    assert result.exit_code == 0
    rows = {r["id"]: r for r in json.loads(result.stdout)["artifacts"]}
    assert rows["m"] == {**rows["m"], "declared": "v1", "current": "v1", "previous": None, "state": "ok", "size": 1}
    assert rows["r"]["kind"] == "loras" and rows["r"]["state"] == "ok" and rows["r"]["verified_at"]
    assert world.current("r", "loras") == "l1"


BAD_INPUTS = [
    ("unknown host", ["apply", "--host", "ghost"], 2, "host 'ghost' is not in the index (hosts: h); pass --host or set ZOO_HOST"),
    ("unknown id", ["rollback", "ghost"], 2, "'ghost' is not in the zoo (artifacts: models/m)"),
    ("missing index", ["apply", "--index", "/nonexistent/index.json"], 2, "/nonexistent/index.json: no such file"),
]


@pytest.mark.parametrize(("name", "args", "code", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_line_and_changes_nothing(world: World, name: str, args: list[str], code: int, message: str) -> None:
    world.artifact("m", "v1", {"a": b"1"})
    world.run("apply")
    before = world.tree()
    result = world.run(*args)
    assert (result.exit_code, result.stderr.strip()) == (code, message)
    assert world.tree() == before


def test_commands_on_a_missing_root_create_nothing(world: World) -> None:
    world.artifact("m", "v1", {"a": b"1"})
    for args in (["rollback", "m"], ["gc"], ["verify", "m"]):
        result = world.run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
        assert not world.root.exists(), args


def test_ambiguous_id_asks_for_the_kind(world: World) -> None:
    world.artifact("m", "v1", {"a": b"1"})
    world.artifact("m", "l1", {"adapter_model.safetensors": b"l"}, kind="loras")
    world.run("apply")
    result = world.run("rollback", "m")
    assert (result.exit_code, result.stderr.strip()) == (2, "'m' is both a model and a lora; say models/m or loras/m")
    assert "no previous version" in world.run("rollback", "loras/m").stderr


def test_repair_rebuilds_a_retained_version_from_its_manifest_or_reports_it_gone(world: World) -> None:
    """A previous version the index no longer declares is fetched again as its own manifest
    pinned it (issue #23); when its source is gone too, it is reported, not invented."""
    world.artifact("m", "v1", {"a": b"one"})
    world.run("apply")
    world.artifact("m", "v2", {"a": b"two"})
    world.run("apply")
    old = world.root / "models/m/versions/v1/a"
    for source_left, code in ((True, 0), (False, 1)):
        old.chmod(0o644)
        old.write_bytes(b"ONE")
        if not source_left:
            shutil.rmtree(world.source_dir("m", "v1"))
        result = world.run("verify", "--repair")
        assert result.exit_code == code, result.output
        assert old.exists() == source_left
        if not source_left:
            assert "models/m/v1 was quarantined and could not be fetched again" in result.stderr
        assert world.current("m") == "v2"


def test_missing_file_source_fails_with_one_line(world: World) -> None:
    world.artifact("m", "v1", {"a": b"1"})
    world.run("apply")
    world.artifact("m", "v2", {"a": b"2"})
    shutil.rmtree(world.source_dir("m", "v2"))
    before = world.tree()
    result = world.run("apply")
    assert result.exit_code == 1
    assert f"file source {world.source_dir('m', 'v2')}: a: no such directory" in result.stderr
    after = world.tree()
    assert after.pop("host/actions.jsonl")[3] != before.pop("host/actions.jsonl")[3]  # the failure is logged
    assert after == before


def test_root_that_is_a_file_is_refused(world: World) -> None:
    world.artifact("m", "v1", {"a": b"1"})
    world.root.write_text("not a dir")
    result = world.run("apply")
    assert (result.exit_code, result.stderr.strip()) == (2, f"{world.root}: the zoo root exists but is not a directory")
    assert world.root.read_text() == "not a dir"


def test_network_filesystem_is_refused_unless_allowed(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.artifact("m", "v1", {"a": b"1"})
    monkeypatch.setattr(store, "filesystem_type", lambda _p: "nfs4")
    result = world.run("apply")
    assert result.exit_code == 2
    assert "is on a network filesystem (nfs4)" in result.stderr and "--allow-network-fs" in result.stderr
    assert not (world.root / "models").exists()
    assert world.run("apply", "--allow-network-fs").exit_code == 0


def test_filesystem_type_reads_mountinfo() -> None:
    assert store.filesystem_type(Path("/proc")) == "proc"


def test_fsync_failure_abandons_staging_and_keeps_current(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant 2: a failed fsync cannot be retried (the pages are marked clean), so the
    staged copy is abandoned rather than published."""
    import errno

    world.artifact("m", "v1", {"a": b"old"})
    assert world.run("apply").exit_code == 0
    world.artifact("m", "v2", {"a": b"new" * 1000})
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if os.path.isfile(f"/proc/self/fd/{fd}") and ".tmp." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    result = world.run("apply")
    assert result.exit_code == 1
    assert "Input/output error while fetching model m v2" in result.stderr
    assert world.current("m") == "v1"
    assert sorted(os.listdir(world.root / "models/m/versions")) == ["v1"]


def test_apply_reports_progress_as_the_units_status(world: World, tmp_path: Path) -> None:
    """Under systemd (NOTIFY_SOCKET) `systemctl status model-zoo-reconcile` shows how far apply got."""
    world.artifact("m", "1", {"config.json": b"{}", "model.safetensors": b"w" * 5000})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    with sock:
        proc = world.spawn("apply", env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        sock.setblocking(False)
        messages = []
        with contextlib.suppress(BlockingIOError):
            while True:
                messages.append(sock.recv(4096).decode())
    assert any(m.startswith("STATUS=fetching m/model.safetensors (5.0 kB); ") and m.endswith(" of 5.0 kB in all") for m in messages), messages
    assert messages[-1] == "STATUS=apply: the zoo matches the index (3 steps done)"
