"""A failed fsync of a staged data file alone abandons the version (invariant 2, issue #24).

test_store's fault fails every fsync in staging, the manifest's too, so a publish path
that ignored the data file's failure still failed on the manifest and passed that test
(`.ci/mutations/fsync-error-ignored` survived it). Here only the data file's fsync fails.
"""

from __future__ import annotations

import errno
import os

import pytest

from tests.support.world import World


def test_a_data_file_whose_fsync_failed_is_never_published(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.artifact("m", "v1", {"weights": b"old"})
    assert world.run("apply").exit_code == 0
    world.artifact("m", "v2", {"weights": b"new" * 1000})
    real_fsync = os.fsync
    failed: list[str] = []

    def failing_fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if ".tmp." in path and os.path.basename(path) == "weights":
            failed.append(path)
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    result = world.run("apply")
    assert failed, "the fault was never injected: the data file is fsynced elsewhere now"
    assert result.exit_code == 1, result.output
    assert "Input/output error while fetching model m v2" in result.stderr
    assert world.current("m") == "v1"
    assert sorted(os.listdir(world.root / "models/m/versions")) == ["v1"]
