"""Hostile and careless input to the index, file sources and the zoo root (issue #17).

Each case asserts the refusal (exit code and the one line), that nothing outside the
test's zoo changed (a victim directory's snapshot), and that no traceback was printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tests.support.victim import make_victim, snapshot
from tests.support.world import World
from zoo_agent.cli.main import cli


def _one_line(result: Result) -> str:
    assert "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Path]:
    path = make_victim(tmp_path / "victim")
    before = snapshot(path)
    yield path
    assert snapshot(path) == before, "something outside the zoo changed"


# -- the index file itself --------------------------------------------------------------


@pytest.mark.parametrize("command", ["validate", "fmt", "plan"])
def test_a_100000_deep_document_is_one_line_not_a_recursion_error(world: World, command: str) -> None:
    world.index.write_text("[" * 100_000 + "]" * 100_000)
    args = [command, str(world.index)] if command != "plan" else ["plan", *world.args()]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert _one_line(result) == f"{world.index}: nests deeper than 64 levels; an index is a few levels of objects"


def test_deep_nesting_that_json_accepts_is_refused_before_the_recursive_readers(world: World) -> None:
    world.index.write_text('{"models": ' + "[" * 500 + "]" * 500 + "}")
    result = world.raw("fmt", str(world.index))
    assert result.exit_code == 2 and "nests deeper than 64 levels" in _one_line(result)


@pytest.mark.parametrize("text, where", [('{"models": {}, "x": "\\ud800"}', "/x: holds"), ('{"models": {}, "\\udc00": 1}', "a key holds")])
def test_a_lone_surrogate_is_named_not_a_unicode_traceback(world: World, text: str, where: str) -> None:
    world.index.write_text(text)
    for command in ("validate", "fmt"):
        result = world.raw(command, str(world.index))
        assert result.exit_code == 2, result.output
        assert where in _one_line(result) and "lone surrogate" in result.stderr
    assert world.index.read_text() == text


def test_fmt_refuses_a_number_json_cannot_hold_and_leaves_the_file(world: World) -> None:
    text = '{"models": {}, "hosts": {}, "x": 1e400}'
    world.index.write_text(text)
    result = world.raw("fmt", str(world.index))
    assert result.exit_code == 2
    assert _one_line(result) == f"{world.index}: the number 1e400 is out of range for a JSON number"
    assert world.index.read_text() == text


def test_fmt_writes_through_a_symlinked_index(world: World, tmp_path: Path) -> None:
    real = tmp_path / "checkout" / "index.json"
    real.parent.mkdir()
    real.write_text('{"models":{},"hosts":{}}')
    os.chmod(real, 0o664)
    link = tmp_path / "index-link.json"
    link.symlink_to(real)
    result = world.raw("fmt", str(link))
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == '{\n  "models": {},\n  "hosts": {}\n}\n'
    assert real.stat().st_mode & 0o777 == 0o664


def test_add_file_writes_through_a_symlinked_index(world: World, tmp_path: Path) -> None:
    world.artifact("m", "v1", {"config.json": b"{}"})
    real = tmp_path / "real-index.json"
    shutil.move(world.index, real)
    world.index.symlink_to(real)
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "w.safetensors").write_bytes(b"weights")
    result = world.raw("add", f"file:{tmp_path / 'new'}", "--id", "n", "--version", "1", "--license", "MIT", "--index", str(world.index))
    assert result.exit_code == 0, result.output
    assert world.index.is_symlink() and "n" in json.loads(real.read_text())["models"]


# -- names the store would trip over mid-apply ------------------------------------------


def _declare(world: World, paths: dict[str, bytes]) -> None:
    world.artifact("m", "v1", paths)


def test_a_declared_manifest_json_is_refused_at_validate(world: World) -> None:
    _declare(world, {"manifest.json": b'{"files": []}', "w.safetensors": b"w"})
    result = world.raw("validate", str(world.index))
    assert result.exit_code == 2
    assert _one_line(result).endswith("/models/m/files/0/path: 'manifest.json' is the name the zoo keeps its own manifest "
                                      "under; put the file in a subdirectory or rename it")
    assert world.run("apply").exit_code == 2 and not world.root.exists()


def test_a_file_beside_a_directory_of_the_same_name_is_refused(world: World) -> None:
    world.models["m"] = {
        "version": "v1", "source": {"type": "file", "path": "src"}, "license": "MIT",
        "files": [{"path": "a", "sha256": hashlib.sha256(b"x").hexdigest(), "size": 1},
                  {"path": "a/b", "sha256": hashlib.sha256(b"y").hexdigest(), "size": 1}],
    }  # fmt: skip
    world.write_index()
    result = world.raw("validate", str(world.index))
    assert result.exit_code == 2
    assert _one_line(result).endswith("/models/m/files/1/path: needs 'a' to be a directory, but /models/m/files/0/path declares it as a file")


def test_a_name_longer_than_a_filesystem_allows_is_refused(world: World) -> None:
    name = "w" * 256 + ".safetensors"
    world.models["m"] = {"version": "v1", "source": {"type": "file", "path": "src"}, "license": "MIT",
                         "files": [{"path": f"d/{name}", "sha256": hashlib.sha256(b"x").hexdigest(), "size": 1}]}  # fmt: skip
    world.write_index()
    result = world.raw("validate", str(world.index))
    assert result.exit_code == 2 and "is 268 bytes; filesystems allow 255 per component" in _one_line(result)


# -- file sources: one rule for symlinks and non-regular files --------------------------


def test_a_symlink_out_of_the_source_directory_is_not_copied(world: World, victim: Path) -> None:
    secret = victim / "precious.txt"
    world.artifact("m", "v1", {"config.json": b"{}", "leak.txt": secret.read_bytes()})
    leak = world.source_dir("m", "v1") / "leak.txt"
    leak.unlink()
    leak.symlink_to(secret)
    result = world.run("apply")
    assert result.exit_code == 1
    assert f"{world.source_dir('m', 'v1')}: leak.txt: is a symlink that leaves the source directory (to {secret})" in result.stderr
    assert "Traceback" not in result.output
    copied = [p for p in world.root.rglob("*") if p.is_file() and secret.read_bytes() in p.read_bytes()]
    assert copied == [] and world.current("m") is None


def test_a_symlink_inside_the_source_directory_is_followed(world: World) -> None:
    world.artifact("m", "v1", {"config.json": b"{}", "blobs/abc": b"weights", "model.safetensors": b"weights"})
    model = world.source_dir("m", "v1") / "model.safetensors"
    model.unlink()
    model.symlink_to("blobs/abc")
    result = world.run("apply")
    assert result.exit_code == 0, result.output
    published = world.root / "models/m/current/model.safetensors"
    assert published.read_bytes() == b"weights" and not published.is_symlink()


def test_a_source_path_that_climbs_out_of_the_index_directory_is_refused(world: World) -> None:
    world.artifact("m", "v1", {"config.json": b"{}"}, source={"type": "file", "path": "../../../../etc"})
    result = world.raw("validate", str(world.index))
    assert result.exit_code == 2
    assert _one_line(result) == (f"{world.index}: /models/m/source/path: must not climb out of the index's directory with '..' "
                                 "('../../../../etc'); write a directory elsewhere as an absolute path")


def test_a_fifo_in_a_file_source_is_refused_without_hanging(world: World) -> None:
    world.artifact("m", "v1", {"config.json": b"{}", "w.safetensors": b"w"})
    fifo = world.source_dir("m", "v1") / "w.safetensors"
    fifo.unlink()
    os.mkfifo(fifo)
    # A real process with a bound: a regression (open() of a FIFO) would block forever.
    proc = world.spawn("apply")
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert "w.safetensors: is not a regular file (a FIFO); file sources read only regular files" in err
    assert "Traceback" not in err


def test_add_file_follows_the_same_rule(world: World, tmp_path: Path, victim: Path) -> None:
    world.artifact("m", "v1", {"config.json": b"{}"})
    src = tmp_path / "train-out"
    (src / "blobs").mkdir(parents=True)
    (src / "blobs" / "abc").write_bytes(b"adapter weights")
    (src / "adapter_model.safetensors").symlink_to("blobs/abc")
    ok = world.raw("add", f"file:{src}", "--id", "n", "--version", "1", "--license", "MIT", "--index", str(world.index), "--json")
    assert ok.exit_code == 0, ok.output
    pinned = sorted(f["path"] for f in json.loads(world.index.read_text())["models"]["n"]["files"])
    assert pinned == ["adapter_model.safetensors", "blobs/abc"]  # the link inside is read like apply reads it

    (src / "stolen").symlink_to(victim / "precious.txt")
    before = world.index.read_text()
    bad = world.raw("add", f"file:{src}", "--id", "o", "--version", "1", "--license", "MIT", "--index", str(world.index))
    assert bad.exit_code == 2
    assert _one_line(bad) == (f"{src / 'stolen'}: is a symlink that leaves the directory (to {victim / 'precious.txt'}); "
                              "copy the file in or remove the link")
    (src / "stolen").unlink()
    os.mkfifo(src / "pipe")
    fifo = world.raw("add", f"file:{src}", "--id", "o", "--version", "1", "--license", "MIT", "--index", str(world.index))
    assert fifo.exit_code == 2 and "pipe: is not a regular file (a FIFO)" in _one_line(fifo)
    assert world.index.read_text() == before


# -- drift a user cannot hide, an unreachable hub, a root we cannot write ---------------


def test_a_same_size_rewrite_with_the_mtime_put_back_is_noticed(world: World) -> None:
    world.artifact("m", "v1", {"config.json": b"{}", "w.safetensors": b"AAAA"})
    assert world.run("apply").exit_code == 0
    target = world.root / "models/m/current/w.safetensors"
    st = target.stat()
    os.chmod(target, 0o640)
    target.write_bytes(b"BBBB")
    os.chmod(target, 0o440)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns, target.stat().st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    status = world.run("status", "--json")
    assert "changed (ctime)" in status.output
    result = world.run("apply")
    assert result.exit_code == 1 and "w.safetensors: sha256 " in result.stderr


def test_add_hf_with_the_hub_unreachable_is_one_line(world: World) -> None:
    world.artifact("m", "v1", {"config.json": b"{}"})
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run([sys.executable, "-m", "zoo_agent", "add", "hf:org/repo", "--id", "x", "--index", str(world.index)],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "hf:org/repo@main: ConnectError: [Errno 111] Connection refused (gave up after 4 attempts)"
    assert "Traceback" not in proc.stderr


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a read-only tmpfs needs root; as root permissions would not stop the write")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "zoo").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("command", [["apply"], ["gc"], ["host", "init"]])
def test_a_read_only_root_is_one_line(world: World, read_only_dir: Path, command: list[str]) -> None:
    world.artifact("m", "v1", {"config.json": b"{}"})
    root = read_only_dir / "zoo"
    args = [*command, "--root", str(root)] + (["--index", str(world.index), "--host", "h"] if command[0] != "host" else [])
    result = world.raw(*args)
    assert result.exit_code == 1, result.output
    assert _one_line(result) == (f"{root / '.lock'}: cannot take the zoo's lock: Read-only file system "
                                 "(the zoo root must be writable by this user; see --root)")


def test_a_root_that_cannot_be_created_is_one_line(world: World, read_only_dir: Path) -> None:
    world.artifact("m", "v1", {"config.json": b"{}"})
    root = read_only_dir / "new-zoo"
    result = world.raw("apply", "--root", str(root), "--index", str(world.index), "--host", "h")
    assert result.exit_code == 1
    assert _one_line(result) == f"{root}: cannot create the zoo root: Read-only file system"


def test_apply_removes_host_state_temp_files_a_killed_run_left(world: World) -> None:
    """A SIGKILL between write_atomic's create and rename leaves `.NAME.PID.RAND.tmp` in host/."""
    world.artifact("m", "v1", {"config.json": b"{}"})
    assert world.run("apply").exit_code == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    orphan = world.root / "host" / f".applied-index.json.{dead.stdout.strip()}.0123abcd.tmp"
    orphan.write_text("half")
    live = world.root / "host" / f".identity.json.{os.getpid()}.0123abcd.tmp"  # a live writer's: left alone
    live.write_text("in progress")
    assert world.run("apply").exit_code == 0
    assert not orphan.exists() and live.exists()
