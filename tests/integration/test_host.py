"""Host state, backups and the action log (issue #10), with real files and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.support.world import World
from zoo_agent.store import host as host_module


def tree_hash(root: Path, *, skip: tuple[str, ...] = (), refetched: bool = False) -> str:
    """Paths, kinds, modes, link targets and contents: what 'byte-identical zoo' means (not
    mtimes). A version fetched again has a new `published_at`, `verified_at` and new file mtimes, ctimes and inodes in its
    manifest (when this host checked it, for the stat-only no-op); with ``refetched`` those
    are left out, every other byte counts."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel in skip:
            continue
        st = path.lstat()
        if path.is_symlink():
            digest.update(f"L {rel} {os.readlink(path)}\n".encode())
        elif path.is_dir():
            digest.update(f"D {rel} {st.st_mode:o}\n".encode())
        else:
            data = path.read_bytes()
            if refetched and path.name == "manifest.json":
                manifest = {k: v for k, v in json.loads(data).items() if k not in ("published_at", "verified_at")}
                manifest["files"] = [{k: v for k, v in f.items() if k not in ("mtime_ns", "ctime_ns", "ino")} for f in manifest["files"]]
                data = json.dumps(manifest).encode()
            digest.update(f"F {rel} {st.st_mode:o} ".encode() + hashlib.sha256(data).digest())
    return digest.hexdigest()


def test_apply_creates_the_identity_and_keeps_it(zoo: World) -> None:
    identity = json.loads((zoo.root / "host" / "identity.json").read_text())
    assert identity["name"] == "h" and len(identity["id"]) == 32 and identity["created"].endswith("Z")
    assert json.loads((zoo.root / "host" / "applied-index.json").read_text()) == json.loads(zoo.index.read_text())
    result = zoo.raw("host", "init", *zoo.args("--json"))
    assert result.exit_code == 0 and json.loads(result.output)["identity"] == identity and json.loads(result.output)["created"] is False


def test_host_import_refuses_to_overwrite_without_force(zoo: World, tmp_path: Path) -> None:
    old = tmp_path / "old-host"
    (old / "app").mkdir(parents=True)
    (old / "app" / "experience.json").write_text('{"episodes": 99}')
    (old / "trust.json").write_text("{}")
    before = zoo.tree()
    result = zoo.raw("host", "init", *zoo.args("--import", str(old)))
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == f"--import {old}: host/app/experience.json exists (1 files would be overwritten); pass --force"
    assert zoo.tree() == before
    result = zoo.raw("host", "init", *zoo.args("--import", str(old)), "--force")
    assert result.exit_code == 0 and "imported 2 files" in result.output
    assert (zoo.root / "host" / "app" / "experience.json").read_text() == '{"episodes": 99}'


def test_gc_never_touches_host_state(zoo: World) -> None:
    before = {p: p.read_bytes() for p in (zoo.root / "host").rglob("*") if p.is_file()}
    zoo.models.clear()
    zoo.loras.clear()
    zoo.write_index()
    assert zoo.run("gc").exit_code == 0
    assert not (zoo.root / "models" / "m").exists()
    assert {p: p.read_bytes() for p in (zoo.root / "host").rglob("*") if p.is_file() and p.name != "actions.jsonl"} == {
        p: b for p, b in before.items() if p.name != "actions.jsonl"}


def test_backup_wipe_restore_apply_gives_the_same_zoo(zoo: World, tmp_path: Path) -> None:
    before = tree_hash(zoo.root, skip=("host/actions.jsonl",), refetched=True)
    log_before = (zoo.root / "host" / "actions.jsonl").read_text()
    result = zoo.run("backup", "--to", str(tmp_path / "bk"), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["bytes_written"] == summary["bytes"] > 0
    manifest = json.loads((tmp_path / "bk" / "backup-manifest.json").read_text())
    paths = {e["path"] for e in manifest["files"]}
    assert {"host/identity.json", "host/app/experience.json", "host/applied-index.json", "resident/tenants/t/lease.json",
            "models/m/versions/1/manifest.json", "loras/lo/versions/1/manifest.json"} <= paths
    assert not any(p.endswith("model.safetensors") for p in paths)  # models only with --include-models
    assert manifest["host"] == "h" and manifest["index_sha256"] == hashlib.sha256(zoo.index.read_bytes()).hexdigest()
    shutil.rmtree(zoo.root)
    result = zoo.run("restore", "--from", str(tmp_path / "bk"))
    assert result.exit_code == 0, result.output
    assert "not in the backup, to fetch: loras/lo/versions/1, models/m/versions/1; next: zoo-agent apply" in result.output
    assert not (zoo.root / "models" / "m" / "versions" / "1").exists()  # no half version: apply fetches it whole
    assert zoo.run("apply").exit_code == 0
    assert tree_hash(zoo.root, skip=("host/actions.jsonl",), refetched=True) == before
    assert (zoo.root / "host" / "actions.jsonl").read_text().startswith(log_before)
    assert (zoo.root / "host" / "app" / "experience.json").read_text() == '{"episodes": 12}'


def test_a_backup_with_models_restores_every_byte_and_apply_fetches_nothing(zoo: World, tmp_path: Path) -> None:
    (zoo.root / "backup-manifest.json").unlink(missing_ok=True)
    before = tree_hash(zoo.root, skip=("host/actions.jsonl",), refetched=True)
    assert zoo.run("backup", "--to", str(tmp_path / "bk"), "--include-models").exit_code == 0
    shutil.rmtree(zoo.root)
    assert zoo.run("restore", "--from", str(tmp_path / "bk")).exit_code == 0
    # Restored files are new inodes: apply re-hashes them once (it trusts no file it did not
    # see written), fetches nothing, and the zoo is the one that was backed up.
    result = zoo.run("apply", "--json")
    assert result.exit_code == 0
    steps = json.loads(result.output[result.output.index("{"):])["steps"]
    assert {(s["action"], s["ok"]) for s in steps} == {("verify", True)}
    assert tree_hash(zoo.root, skip=("host/actions.jsonl",), refetched=True) == before
    assert json.loads(zoo.run("apply", "--json").output)["steps"] == []


def test_a_damaged_backup_is_refused_naming_the_file_and_nothing_changes(zoo: World, tmp_path: Path) -> None:
    assert zoo.run("backup", "--to", str(tmp_path / "bk")).exit_code == 0
    damaged = tmp_path / "bk" / "files" / "host" / "app" / "experience.json"
    data = bytearray(damaged.read_bytes())
    data[3] ^= 0x01
    damaged.write_bytes(bytes(data))
    (zoo.root / "host" / "app" / "experience.json").write_text('{"episodes": 13}')
    before = zoo.tree()
    result = zoo.run("restore", "--from", str(tmp_path / "bk"))
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"{tmp_path / 'bk'}: 1 damaged file(s), nothing restored: host/app/experience.json (sha256 "), line
    assert zoo.tree() == before


def test_a_second_backup_of_an_unchanged_zoo_writes_nothing(zoo: World, tmp_path: Path) -> None:
    first = json.loads(zoo.run("backup", "--to", str(tmp_path / "bk"), "--include-models", "--json").output)
    second = json.loads(zoo.run("backup", "--to", str(tmp_path / "bk"), "--include-models", "--json").output)
    assert first["bytes_written"] > 70_000 and second["bytes_written"] == 0 and second["files"] == first["files"]
    (zoo.root / "host" / "app" / "experience.json").write_text('{"episodes": 1300}')
    third = json.loads(zoo.run("backup", "--to", str(tmp_path / "bk"), "--include-models", "--json").output)
    assert third["bytes_written"] == len('{"episodes": 1300}')
    assert json.loads((zoo.root / "backup-manifest.json").read_text())["bytes_written"] == third["bytes_written"]


def test_backup_refuses_a_destination_inside_the_zoo(zoo: World) -> None:
    result = zoo.run("backup", "--to", str(zoo.root / "bk"))
    assert result.exit_code == 2 and result.output.strip().endswith(f"--to {zoo.root / 'bk'}: inside the zoo it backs up; choose another place")


def test_log_reads_actions_across_rotations(zoo: World, monkeypatch: pytest.MonkeyPatch) -> None:
    result = zoo.run("log", "--json")
    actions = json.loads(result.output)["actions"]
    assert {(a["action"], a["id"], a["result"]) for a in actions} >= {("fetch", "m", "ok"), ("swap-current", "lo", "ok")}
    monkeypatch.setattr(host_module, "ROTATE_BYTES", 200)
    zoo.artifact("m", "2", {"config.json": b'{"a": 2}'})
    assert zoo.run("apply").exit_code == 0
    assert (zoo.root / "host" / "actions.jsonl.1").exists()
    later = json.loads(zoo.run("log", "--json").output)["actions"]
    assert later[: len(actions)] == actions and any(a["version"] == "2" for a in later)
    assert json.loads(zoo.run("log", "--since", "1h", "--json").output)["actions"] == later
    assert json.loads(zoo.run("log", "--since", "2999-01-01", "--json").output)["actions"] == []
    text = zoo.run("log").output.splitlines()
    assert len(text) == len(later) and " ok     fetch model m 2 " in text[-3] + text[-2] + text[-1]
    bad = zoo.run("log", "--since", "yesterday")
    assert bad.exit_code == 2 and "--since 'yesterday': expected a date" in bad.output


def test_restoring_from_something_that_is_not_a_backup_creates_nothing(world: World, tmp_path: Path) -> None:
    (tmp_path / "not-a-backup").mkdir()
    result = world.run("restore", "--from", str(tmp_path / "not-a-backup"))
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == f"--from {tmp_path / 'not-a-backup'}: no backup-manifest.json (not a backup, or one that did not finish)"
    assert not world.root.exists()
    result = world.raw("host", "init", *world.args("--import", str(tmp_path / "nowhere")))
    assert result.exit_code == 2 and result.output.strip().endswith(f"--import {tmp_path / 'nowhere'}: not a directory")
    assert not world.root.exists()


def test_the_action_log_is_0640_whatever_the_umask(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd (UMask=0027) open(..., "a") made host/actions.jsonl 0644 (issue #31)."""
    from tests.support.victim import make_victim, snapshot

    old = os.umask(0o022)
    try:
        world.artifact("m", "1", {"config.json": b'{"a": 1}'})
        assert world.run("apply").exit_code == 0
        log = world.root / "host" / "actions.jsonl"
        assert oct(log.stat().st_mode & 0o777) == oct(0o640)
        os.chmod(log, 0o644)  # a log an older zoo-agent made is brought to the mode too
        world.artifact("m", "2", {"config.json": b'{"a": 2}'})
        assert world.run("apply").exit_code == 0
        assert oct(log.stat().st_mode & 0o777) == oct(0o640)
        monkeypatch.setattr(host_module, "ROTATE_BYTES", 1)  # every line starts a new file
        world.artifact("m", "2b", {"config.json": b'{"a": 22}'})
        assert world.run("apply").exit_code == 0
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in log.parent.glob("actions.jsonl*")}
        assert len(modes) > 2 and set(modes.values()) == {oct(0o640)}, modes
        # A link in its place is not followed: the file it points to is left as it was.
        victim = make_victim(tmp_path / "victim")
        before = snapshot(victim)
        for part in log.parent.glob("actions.jsonl*"):
            part.unlink()
        log.symlink_to(victim / "precious.txt")
        world.artifact("m", "3", {"config.json": b'{"a": 3}'})
        assert world.run("apply").exit_code == 0
        assert snapshot(victim) == before
    finally:
        os.umask(old)
