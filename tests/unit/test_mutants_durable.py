"""store/durable.py on a real filesystem: temp names, sweeping, atomic writes (issue #24).

These primitives were exercised only through the integration tests' applies, so under the
unit tests `bash .ci/mutate` found their mutants alive: a sweep that removed a live
writer's file, or a write that left world-readable state, would have passed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zoo_agent.store.durable import (
    DIR_MODE,
    FILE_MODE,
    PUBLISHED_MODE,
    makedirs_durable,
    sweep_temps,
    temp_name,
    write_atomic,
)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_modes() -> None:
    assert (DIR_MODE, FILE_MODE, PUBLISHED_MODE) == (0o750, 0o640, 0o440)


def test_temp_names_are_hidden_siblings_unique_to_this_process(tmp_path: Path) -> None:
    names = {temp_name(tmp_path / "state.json") for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert name.parent == tmp_path
        assert re.fullmatch(rf"\.state\.json\.{os.getpid()}\.[0-9a-f]{{8}}\.tmp", name.name), name


def test_sweep_removes_only_a_dead_writers_temp_files(tmp_path: Path) -> None:
    dead, live = _dead_pid(), os.getpid()
    keep = [f".a.{live}.0123abcd.tmp", "a.json", f".a.{dead}.0123abcd.tmp.x", f"a.{dead}.0123abcd.tmp", f".a.{dead}.0123ABCD.tmp",
            f".a.{dead}.0123abc.tmp", ".a.1.0123abcd.tmp"]  # a live writer, other names, pid 1 (alive, maybe not ours)  # fmt: skip
    gone = [f".a.{dead}.0123abcd.tmp", f".b.json.{dead}.ffffffff.tmp"]
    for name in keep + gone:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / f".d.{dead}.0123abcd.tmp").mkdir()  # only files are swept
    (tmp_path / f".l.{dead}.0123abcd.tmp").symlink_to(tmp_path / "a.json")
    assert sorted(sweep_temps(tmp_path)) == sorted(gone)
    assert sorted(os.listdir(tmp_path)) == sorted(keep + [f".d.{dead}.0123abcd.tmp", f".l.{dead}.0123abcd.tmp"])
    assert sweep_temps(tmp_path) == []
    assert sweep_temps(tmp_path / "missing") == []


def test_sweep_neither_removes_nor_signals_a_live_writers_files(tmp_path: Path) -> None:
    """The liveness probe is signal 0: a live writer (another process) keeps its file and is left running."""
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        name = f".a.{writer.pid}.0123abcd.tmp"
        (tmp_path / name).write_bytes(b"x")
        assert sweep_temps(tmp_path) == []
        assert os.listdir(tmp_path) == [name]
        assert writer.poll() is None
    finally:
        writer.kill()
        writer.wait()


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    old = os.umask(0o077)  # the mode is set explicitly, not left to the umask
    try:
        target = tmp_path / "state.json"
        write_atomic(target, b"one")
        assert (target.read_bytes(), target.stat().st_mode & 0o7777) == (b"one", FILE_MODE)
        target.chmod(0o600)
        write_atomic(target, b"two" * 100_000)  # an existing file keeps its mode
        assert (target.read_bytes(), target.stat().st_mode & 0o7777) == (b"two" * 100_000, 0o600)
        write_atomic(target, b"", mode=0o444)
        assert (target.read_bytes(), target.stat().st_mode & 0o7777) == (b"", 0o444)
        assert os.listdir(tmp_path) == ["state.json"]
    finally:
        os.umask(old)


def test_a_failed_write_atomic_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "d"
    target.mkdir()
    (target / "inside").write_bytes(b"old")
    with pytest.raises(OSError):
        write_atomic(target, b"new")  # a file cannot replace a non-empty directory
    assert sorted(os.listdir(tmp_path)) == ["d"] and (target / "inside").read_bytes() == b"old"


def test_makedirs_durable_creates_every_level_with_its_mode(tmp_path: Path) -> None:
    old = os.umask(0)  # mkdir's mode is filtered by the umask (the units set 0027); none here, to see it
    try:
        deep = tmp_path / "a" / "b" / "c"
        makedirs_durable(deep)
        for level in (tmp_path / "a", tmp_path / "a" / "b", deep):
            assert level.stat().st_mode & 0o7777 == DIR_MODE
        makedirs_durable(deep / "d", mode=0o705)
        assert (deep / "d").stat().st_mode & 0o7777 == 0o705
        makedirs_durable(deep)  # already there: nothing to do
        (tmp_path / "x").mkdir(mode=0o755)
        makedirs_durable(tmp_path / "x" / "y")
        assert (tmp_path / "x" / "y").stat().st_mode & 0o7777 == DIR_MODE
        assert (tmp_path / "x").stat().st_mode & 0o777 == 0o755  # an existing level is left alone
    finally:
        os.umask(old)
