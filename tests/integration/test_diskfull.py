"""Disk full on a real tmpfs mounted by the test: preflight and ENOSPC mid-write (issue #3)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.httpfiles import serve
from tests.support.world import World


@pytest.fixture
def small_root(world: World) -> Iterator[Path]:
    """A 4 MiB tmpfs as the zoo root."""
    world.root.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(world.root)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {proc.stderr.strip()}")
    try:
        yield world.root
    finally:
        subprocess.run(["umount", "-l", str(world.root)], check=False)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_preflight_refuses_before_the_first_byte(world: World, small_root: Path) -> None:
    world.artifact("m", "v1", {"a": b"small"})
    assert world.run("apply").exit_code == 0
    world.artifact("m", "v2", {"a": os.urandom(3 << 20), "b": os.urandom(2 << 20)})
    result = world.run("apply")
    assert result.exit_code == 1
    assert "not enough free space: need 5.2 MB" in result.stderr
    assert world.current("m") == "v1"
    assert [p for p in small_root.rglob("*") if ".tmp" in p.name] == []


def test_enospc_mid_write_keeps_current_and_leaves_no_staging(world: World, small_root: Path) -> None:
    world.artifact("m", "v1", {"a": b"old"})
    assert world.run("apply").exit_code == 0
    data = os.urandom(2 << 20)
    with serve({"w": data}) as server:
        server.faults.pause_at["w"] = 256 << 10
        world.artifact("m", "v2", {"w": data}, source={"type": "url", "base_url": server.url})
        proc = world.spawn("apply")
        assert server.faults.paused.wait(timeout=30)  # preflight passed; now the disk fills up
        filler = small_root / "filler"
        filler.write_bytes(b"\0" * (_free(small_root) - (128 << 10)))
        server.faults.resume.set()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "No space left on device" in err and "Traceback" not in err
    assert (small_root / "models/m/current/a").read_bytes() == b"old"
    assert [p for p in small_root.rglob("*") if ".tmp" in p.name] == []  # no staging bytes
    filler.unlink()
