"""Hostile backups, destinations and disks (issue #17): nothing escapes the zoo or the backup
directory, nothing of the user's is deleted, and every refusal is one line with its exit code."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from tests.support.victim import make_victim, snapshot
from tests.support.world import World


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    return make_victim(tmp_path / "victim")


def refused(result: Result, code: int, line: str) -> None:
    """A handled error: no traceback, the exit code, and exactly this one line."""
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == code, result.output
    assert result.output.strip().splitlines() == [line]


def temp_names(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


def backed_up(zoo: World, tmp_path: Path, *extra: str) -> Path:
    bk = tmp_path / "bk"
    result = zoo.run("backup", "--to", str(bk), *extra)
    assert result.exit_code == 0, result.output
    return bk


def read_manifest(bk: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((bk / "backup-manifest.json").read_text())
    return data


def index_of(entries: list[dict[str, Any]], path: str) -> int:
    return next(i for i, e in enumerate(entries) if e["path"] == path)


# -- backup: item 1 (deletes what it did not write), item 2 (follows links) ----------------------


def test_backup_refuses_a_non_empty_directory_without_a_manifest(zoo: World, tmp_path: Path, victim: Path) -> None:
    dest = tmp_path / "elsewhere"
    (dest / "files" / "host").mkdir(parents=True)
    (dest / "files" / "photo.jpg").write_bytes(b"\xff\xd8 the user's photo")
    (dest / "files" / "host" / "identity.json").write_text("the user's, not ours")
    before, victim_before = snapshot(dest), snapshot(victim)
    refused(zoo.run("backup", "--to", str(dest)), 2, f"{dest} is not empty and holds no backup-manifest.json; choose an empty directory")
    refused(zoo.run("backup", "--to", str(victim)), 2, f"{victim} is not empty and holds no backup-manifest.json; choose an empty directory")
    assert snapshot(dest) == before and snapshot(victim) == victim_before


def test_backup_removes_and_replaces_only_what_its_manifest_lists(zoo: World, tmp_path: Path, victim: Path) -> None:
    bk = backed_up(zoo, tmp_path)
    (bk / "files" / "host" / "mine.txt").write_text("the user's own")
    (bk / "README").write_text("offsite copy, rotated weekly")
    (zoo.root / "host" / "app" / "experience.json").unlink()  # gone from the zoo: its copy is stale
    victim_before = snapshot(victim)
    assert zoo.run("backup", "--to", str(bk)).exit_code == 0
    assert not (bk / "files" / "host" / "app" / "experience.json").exists()
    assert (bk / "files" / "host" / "mine.txt").read_text() == "the user's own" and (bk / "README").exists()
    assert "host/app/experience.json" not in {e["path"] for e in read_manifest(bk)["files"]}
    (zoo.root / "host" / "mine.txt").write_text("the zoo's")  # its copy would replace the user's file
    before = snapshot(bk)
    refused(zoo.run("backup", "--to", str(bk)), 2, f"{bk / 'files' / 'host' / 'mine.txt'}: not written by an earlier backup "
                                                  "(not in its backup-manifest.json); move it away or choose an empty directory")
    assert snapshot(bk) == before and snapshot(victim) == victim_before


@pytest.mark.parametrize("planted", ["files", "files/host", "files/host/app", "files/host/identity.json"])
def test_backup_never_follows_a_link_in_its_destination(zoo: World, tmp_path: Path, victim: Path, planted: str) -> None:
    bk = backed_up(zoo, tmp_path)
    link = bk / planted
    if link.is_dir():
        shutil.rmtree(link)
        os.symlink(victim, link)
    else:
        link.unlink()
        os.symlink(victim / "precious.txt", link)
    (zoo.root / "host" / "app" / "experience.json").write_text('{"episodes": 13}')  # something to write
    (zoo.root / "host" / "identity.json").touch()
    before, victim_before = snapshot(bk), snapshot(victim)
    wanted = "a file" if planted.endswith(".json") else "a directory"
    refused(zoo.run("backup", "--to", str(bk)), 2, f"{link}: a symbolic link, not {wanted}; backup never follows links "
                                                  "in its destination (remove it, or choose an empty directory)")
    assert snapshot(bk) == before and snapshot(victim) == victim_before


def test_backup_narrows_modes_and_leaves_out_links_out_of_the_zoo(zoo: World, tmp_path: Path, victim: Path) -> None:
    """An application's 0644 file and 0755 directory come back 0640/0750 (what the zoo's own writers
    use; its root is 0750 anyway); a link to outside the zoo is not backed up, and says so."""
    (zoo.root / "host" / "wide").mkdir(mode=0o755)
    (zoo.root / "host" / "wide" / "state.json").write_text("{}")
    os.chmod(zoo.root / "host" / "wide" / "state.json", 0o4755)
    os.symlink(victim, zoo.root / "host" / "outside")
    os.symlink("wide/state.json", zoo.root / "host" / "inside")
    result = zoo.run("backup", "--to", str(tmp_path / "bk"))
    assert result.exit_code == 0, result.output
    assert (f"zoo-agent: not backed up: {zoo.root / 'host' / 'outside'} (target '{victim}' leaves the link's directory; "
            "links point only below it (relative, no '..'))") in result.output
    shutil.rmtree(zoo.root)
    assert zoo.run("restore", "--from", str(tmp_path / "bk")).exit_code == 0
    assert (zoo.root / "host" / "wide").stat().st_mode & 0o7777 == 0o750
    assert (zoo.root / "host" / "wide" / "state.json").stat().st_mode & 0o7777 == 0o640
    assert os.readlink(zoo.root / "host" / "inside") == "wide/state.json" and not (zoo.root / "host" / "outside").exists()


# -- restore: item 3 (trusts paths, modes, links), item 4 (malformed manifests) ------------------

Mutation = Callable[[dict[str, Any], Path], str]  # edits the manifest, returns the expected "pointer: problem"


def _file(m: dict[str, Any], path: str, data: bytes = b"x") -> int:
    m["files"].append({"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "mode": 0o640, "mtime_ns": 0})
    return len(m["files"]) - 1


def _dotdot(m: dict[str, Any], victim: Path) -> str:
    n = _file(m, "../victim/precious.txt", (victim / "precious.txt").read_bytes())
    return f"/files/{n}/path: '../victim/precious.txt' climbs out with '..'; paths stay inside the zoo root"


def _absolute(m: dict[str, Any], victim: Path) -> str:
    n = _file(m, str(victim / "precious.txt"), (victim / "precious.txt").read_bytes())
    return f"/files/{n}/path: '{victim / 'precious.txt'}' is absolute; paths are relative to the zoo root"


def _outside_place(m: dict[str, Any], victim: Path) -> str:
    n = _file(m, "etc/passwd")
    return f"/files/{n}/path: 'etc/passwd' is not a place backups restore to (host/…, resident/… or models|loras/<id>/versions/<version>/…)"


def _not_normalized(m: dict[str, Any], victim: Path) -> str:
    n = _file(m, "host/./app//x")
    return f"/files/{n}/path: 'host/./app//x' is not normalized; write 'host/app/x'"


def _chmod_outside(m: dict[str, Any], victim: Path) -> str:
    m["dirs"].append({"path": "../victim", "mode": 0o777})
    return f"/dirs/{len(m['dirs']) - 1}/path: '../victim' climbs out with '..'; paths stay inside the zoo root"


def _dir_0777(m: dict[str, Any], victim: Path) -> str:
    n = index_of(m["dirs"], "host")
    m["dirs"][n]["mode"] = 0o777
    return f"/dirs/{n}/mode: mode 0777 is not one the zoo's directories have (0700 to 0750; no setuid, setgid, sticky or access for others)"


def _setuid(m: dict[str, Any], victim: Path) -> str:
    n = index_of(m["files"], "host/identity.json")
    m["files"][n]["mode"] = 0o4750
    return f"/files/{n}/mode: mode 4750 is wider than the zoo's files (at most 0640; no setuid, setgid, sticky or access for others)"


def _world_writable(m: dict[str, Any], victim: Path) -> str:
    n = index_of(m["files"], "host/app/experience.json")
    m["files"][n]["mode"] = 0o666
    return f"/files/{n}/mode: mode 0666 is wider than the zoo's files (at most 0640; no setuid, setgid, sticky or access for others)"


def _link_absolute(m: dict[str, Any], victim: Path) -> str:
    m["links"].append({"path": "host/escape", "target": str(victim)})
    return f"/links/{len(m['links']) - 1}/target: target '{victim}' leaves the link's directory; links point only below it (relative, no '..')"


def _link_dotdot(m: dict[str, Any], victim: Path) -> str:
    m["links"].append({"path": "host/escape", "target": "../../victim"})
    return f"/links/{len(m['links']) - 1}/target: target '../../victim' leaves the link's directory; links point only below it (relative, no '..')"


def _current_elsewhere(m: dict[str, Any], victim: Path) -> str:
    n = index_of(m["links"], "models/m/current")
    m["links"][n]["target"] = "versions/../../../../victim"
    return f"/links/{n}/target: target 'versions/../../../../victim' is not versions/<version>"


def _under_a_link(m: dict[str, Any], victim: Path) -> str:
    m["links"].append({"path": "host/via", "target": "app"})
    n = _file(m, "host/via/experience.json")
    return f"/files/{n}/path: 'host/via/experience.json' lies under /links/{len(m['links']) - 1}/path ('host/via'), which is not a directory"


def _twice(m: dict[str, Any], victim: Path) -> str:
    first = index_of(m["files"], "host/identity.json")
    n = _file(m, "host/identity.json")
    return f"/files/{n}/path: 'host/identity.json' is listed twice (also at /files/{first}/path)"


HOSTILE = [_dotdot, _absolute, _outside_place, _not_normalized, _chmod_outside, _dir_0777, _setuid, _world_writable,
           _link_absolute, _link_dotdot, _current_elsewhere, _under_a_link, _twice]  # fmt: skip


def _restore_is_refused(zoo: World, tmp_path: Path, victim: Path, bk: Path, code: int, line: str) -> None:
    """Refused into a fresh root (never created) and into the existing zoo (byte-identical after)."""
    (zoo.root / "host" / "app" / "experience.json").write_text('{"episodes": 13}')  # differs from the backup
    fresh = tmp_path / "fresh"
    before, victim_before, backup_before = zoo.tree(), snapshot(victim), snapshot(bk)
    refused(zoo.run("restore", "--from", str(bk), "--root", str(fresh)), code, line)
    assert not fresh.exists()
    refused(zoo.run("restore", "--from", str(bk)), code, line)
    assert zoo.tree() == before and snapshot(victim) == victim_before and snapshot(bk) == backup_before


@pytest.mark.parametrize("mutate", HOSTILE, ids=[f.__name__.strip("_") for f in HOSTILE])
def test_restore_refuses_a_manifest_that_reaches_outside_the_zoo(zoo: World, tmp_path: Path, victim: Path, mutate: Mutation) -> None:
    bk = backed_up(zoo, tmp_path, "--include-models")
    manifest = read_manifest(bk)
    problem = mutate(manifest, victim)
    (bk / "backup-manifest.json").write_text(json.dumps(manifest))
    _restore_is_refused(zoo, tmp_path, victim, bk, 2, f"{bk / 'backup-manifest.json'}: {problem}")


MALFORMED: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("not-json", lambda m: b"{'format': 1", "not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ("a-list", lambda m: [m], "not a JSON object"),
    ("no-files", lambda m: {"format": 1}, "/files: Field required"),
    ("files-a-string", lambda m: {**m, "files": "host/identity.json"}, "/files: Input should be a valid list"),
    ("format-2", lambda m: {**m, "format": 2}, "/format: Input should be 1"),
    ("path-a-number", lambda m: {**m, "files": [{**m["files"][0], "path": 7}]}, "/files/0/path: Input should be a valid string"),
    ("no-sha256", lambda m: {**m, "files": [{k: v for k, v in f.items() if k != "sha256"} for f in m["files"]]},
     "/files/0/sha256: Field required (and {n} more)"),
    ("negative-size", lambda m: {**m, "files": [{**m["files"][0], "size": -1}]}, "/files/0/size: Input should be greater than or equal to 0"),
    ("mode-a-string", lambda m: {**m, "dirs": [{"path": "host", "mode": "0750"}]}, "/dirs/0/mode: Input should be a valid integer"),
    # Before, the files were restored (host/ changed) and only then did a KeyError end the run.
    ("link-without-target", lambda m: {**m, "links": [{"path": "host/a"}]}, "/links/0/target: Field required"),
    ("two-problems", lambda m: {**m, "host": 0, "include_models": "no"}, "/host: Input should be a valid string (and 1 more)"),
]


@pytest.mark.parametrize(("make", "problem"), [(m, p) for _, m, p in MALFORMED], ids=[name for name, _, _ in MALFORMED])
def test_restore_refuses_a_malformed_manifest_before_changing_anything(zoo: World, tmp_path: Path, victim: Path,
                                                                       make: Callable[[dict[str, Any]], Any], problem: str) -> None:  # fmt: skip
    bk = backed_up(zoo, tmp_path)
    manifest = read_manifest(bk)
    document = make(manifest)
    (bk / "backup-manifest.json").write_bytes(document if isinstance(document, bytes) else json.dumps(document).encode())
    problem = problem.replace("{n}", str(len(manifest["files"]) - 1))
    _restore_is_refused(zoo, tmp_path, victim, bk, 2, f"{bk / 'backup-manifest.json'}: {problem}")


def test_restore_refuses_a_deeply_nested_manifest(zoo: World, tmp_path: Path, victim: Path) -> None:
    bk = backed_up(zoo, tmp_path)
    (bk / "backup-manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    (zoo.root / "host" / "app" / "experience.json").write_text('{"episodes": 13}')
    before = zoo.tree()
    result = zoo.run("restore", "--from", str(bk))
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"{bk / 'backup-manifest.json'}: not JSON (maximum recursion depth exceeded while decoding a JSON array from a unicode string)"]
    assert zoo.tree() == before


@pytest.mark.parametrize("where", ["file", "directory", "manifest"])
def test_restore_never_reads_a_backup_through_a_link(zoo: World, tmp_path: Path, victim: Path, where: str) -> None:
    """A backed-up file that is a link to a root-only file would land in host/ readable by the group."""
    secret = victim / "shadow"
    secret.write_bytes(b"root:$6$only root reads this\n")
    os.chmod(secret, 0o600)
    bk = backed_up(zoo, tmp_path)
    manifest = read_manifest(bk)
    if where == "file":
        entry = manifest["files"][index_of(manifest["files"], "host/app/experience.json")]
        entry.update(size=len(secret.read_bytes()), sha256=hashlib.sha256(secret.read_bytes()).hexdigest())
        (bk / "backup-manifest.json").write_text(json.dumps(manifest))
        link, wanted = bk / "files" / "host" / "app" / "experience.json", "a file"
        link.unlink()
        os.symlink(secret, link)
        rule = "restore reads a backup only from regular files, never through links"
    elif where == "directory":  # the whole of host/ from a tree someone else controls
        link, wanted = bk / "files" / "host", "a directory"
        shutil.move(link, tmp_path / "forged-host")
        os.symlink(tmp_path / "forged-host", link)
        rule = "restore reads a backup only from regular files, never through links"
    else:
        link, wanted = bk / "backup-manifest.json", "a file"
        shutil.move(link, tmp_path / "forged-manifest.json")
        os.symlink(tmp_path / "forged-manifest.json", link)
        rule = "a backup's manifest is read only from a regular file"
    _restore_is_refused(zoo, tmp_path, victim, bk, 2, f"{link}: a symbolic link, not {wanted}; {rule}")


def test_restore_never_writes_through_a_link_in_the_zoo(zoo: World, tmp_path: Path, victim: Path) -> None:
    bk = backed_up(zoo, tmp_path)
    shutil.rmtree(zoo.root / "host" / "app")
    os.symlink(victim, zoo.root / "host" / "app")  # planted: host/app/experience.json would land in the victim
    before, victim_before = zoo.tree(), snapshot(victim)
    refused(zoo.run("restore", "--from", str(bk)), 1, f"{zoo.root / 'host' / 'app'}: a symbolic link, not a directory; "
                                                     "restore never writes through links in the zoo (move it away and restore again)")
    assert zoo.tree() == before and snapshot(victim) == victim_before


def test_restore_never_makes_a_link_that_leads_out_through_one_already_there(zoo: World, tmp_path: Path, victim: Path) -> None:
    """host/alias -> later is inside the zoo, but host/later was planted as a link to the victim (found by the fuzz test)."""
    os.symlink("later", zoo.root / "host" / "alias")
    bk = backed_up(zoo, tmp_path)
    (zoo.root / "host" / "alias").unlink()
    os.symlink(victim, zoo.root / "host" / "later")
    before, victim_before = zoo.tree(), snapshot(victim)
    refused(zoo.run("restore", "--from", str(bk)), 1, f"{zoo.root / 'host' / 'alias'}: target 'later' leads out of the zoo through a link "
                                                     "already there; restore never writes through links in the zoo (move it away and restore again)")
    assert zoo.tree() == before and snapshot(victim) == victim_before


# -- item 5: a full, read-only or failing disk is one line, and leaves no half-written file -------


def _failing(monkeypatch: pytest.MonkeyPatch, call: str, code: int) -> None:
    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, call, fail)


DISK_FAULTS = [("write", errno.ENOSPC), ("fsync", errno.EIO), ("mkdir", errno.EROFS)]


@pytest.mark.parametrize(("call", "code"), DISK_FAULTS, ids=[errno.errorcode[c] for _, c in DISK_FAULTS])
@pytest.mark.parametrize("command", ["host init", "apply"])
def test_host_state_on_a_failing_disk_is_one_line(world: World, monkeypatch: pytest.MonkeyPatch, call: str, code: int, command: str) -> None:
    world.artifact("m", "1", {"config.json": b"{}"})
    world.root.mkdir(mode=0o750)
    argv = [*command.split(), *world.args()]
    _failing(monkeypatch, call, code)
    result = world.raw(*argv)
    monkeypatch.undo()
    refused(result, 1, f"{world.root / 'host' / 'identity.json'}: {os.strerror(code)} while writing the host identity")
    assert not (world.root / "host" / "identity.json").exists() and temp_names(world.root) == []
    assert world.raw(*argv).exit_code == 0  # the disk is back: it just works


def test_a_broken_identity_is_one_line(world: World) -> None:
    world.artifact("m", "1", {"config.json": b"{}"})
    (world.root / "host").mkdir(parents=True)
    (world.root / "host" / "identity.json").write_text('{"name": "h", "id": ')
    path = world.root / "host" / "identity.json"
    refused(world.raw("host", "init", *world.args()), 1, f"{path}: not a host identity (not a JSON object); make a new one with zoo-agent host init --force")
    assert world.raw("host", "init", *world.args("--force")).exit_code == 0


@pytest.mark.parametrize(("call", "code"), DISK_FAULTS[:2], ids=[errno.errorcode[c] for _, c in DISK_FAULTS[:2]])
def test_backup_on_a_failing_disk_is_one_line_and_keeps_the_last_backup(zoo: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                         call: str, code: int) -> None:  # fmt: skip
    bk = backed_up(zoo, tmp_path)
    (zoo.root / "host" / "new.json").write_text("{}")  # a file of its own: left behind, the next run would refuse it
    os.chmod(zoo.root / "host" / "new.json", 0o640)
    (zoo.root / "host" / "app" / "experience.json").write_text('{"episodes": 13}')
    manifest, summary = (bk / "backup-manifest.json").read_bytes(), (zoo.root / "backup-manifest.json").read_bytes()
    _failing(monkeypatch, call, code)
    result = zoo.run("backup", "--to", str(bk))
    monkeypatch.undo()
    refused(result, 1, f"{bk / 'files' / 'host' / 'app' / 'experience.json'}: {os.strerror(code)} while backing up")
    assert (bk / "backup-manifest.json").read_bytes() == manifest and (zoo.root / "backup-manifest.json").read_bytes() == summary
    assert temp_names(bk) == [] and not (bk / "files" / "host" / "new.json").exists()
    assert zoo.run("backup", "--to", str(bk)).exit_code == 0


def test_a_first_backup_on_a_full_disk_leaves_the_directory_reusable(zoo: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bk = tmp_path / "bk"
    _failing(monkeypatch, "fsync", errno.ENOSPC)
    result = zoo.run("backup", "--to", str(bk))
    monkeypatch.undo()
    refused(result, 1, f"{bk}: No space left on device while backing up")
    _failing(monkeypatch, "replace", errno.ENOSPC)
    result = zoo.run("backup", "--to", str(bk))
    monkeypatch.undo()
    refused(result, 1, f"{bk / 'files' / 'host' / 'actions.jsonl'}: No space left on device while backing up")
    assert [p for p in bk.rglob("*") if not p.is_dir()] == []
    assert zoo.run("backup", "--to", str(bk)).exit_code == 0


def test_a_failed_backup_cleans_up_only_its_own_files(zoo: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest that lists no files still means the directory holds other things: never rmtree it."""
    bk = tmp_path / "bk"
    (bk / "files").mkdir(parents=True)
    (bk / "backup-manifest.json").write_text(json.dumps({"format": 1, "files": []}))
    (bk / "files" / "photo.jpg").write_bytes(b"the user's")
    _failing(monkeypatch, "fsync", errno.ENOSPC)
    result = zoo.run("backup", "--to", str(bk))
    monkeypatch.undo()
    refused(result, 1, f"{bk / 'files' / 'host' / 'actions.jsonl'}: No space left on device while backing up")
    assert (bk / "files" / "photo.jpg").read_bytes() == b"the user's" and temp_names(bk) == []
    assert sorted(p.name for p in bk.rglob("*") if p.is_file()) == ["backup-manifest.json", "photo.jpg"]


def test_restore_on_a_full_disk_is_one_line_and_leaves_no_staging(zoo: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bk = backed_up(zoo, tmp_path, "--include-models")
    shutil.rmtree(zoo.root)
    zoo.root.mkdir(mode=0o750)
    real_write = os.write
    calls = []

    def write(fd: int, data: Any) -> int:
        calls.append(fd)
        if len(calls) > 6:  # host/ and resident/ land, then the disk fills up inside a version
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    result = zoo.run("restore", "--from", str(bk))
    monkeypatch.undo()
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith(str(zoo.root)) and line.endswith(": No space left on device while restoring"), line
    assert temp_names(zoo.root) == []
    assert zoo.run("restore", "--from", str(bk)).exit_code == 0


# -- item 6 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("since", ["99999999999d", "9999999999999999999w", "1" * 5000 + "s"])
def test_log_since_too_far_back_is_a_usage_error(zoo: World, since: str) -> None:
    refused(zoo.run("log", "--since", since), 2, f"--since '{since}': reaches back before the year 1; use a smaller span or a date (2026-11-21)")


def test_host_import_refuses_a_link(zoo: World, tmp_path: Path, victim: Path) -> None:
    old = tmp_path / "old-host"
    old.mkdir()
    os.symlink(victim / "readonly.txt", old / "trust.json")
    before = zoo.tree()
    refused(zoo.raw("host", "init", *zoo.args("--import", str(old), "--force")), 2,
            f"--import {old}: trust.json is a symbolic link; only regular files are imported")
    assert zoo.tree() == before
