"""A local directory: air-gapped hosts, shared storage, training pipelines, tests.

The one rule for what a file source reads (issue #17), shared with ``add file:``: a
symlink is followed only when its target stays inside the source directory, and only
regular files are read (a FIFO would block ``apply`` while it holds the lock).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from zoo_agent.errors import SourceError
from zoo_agent.sources import CHUNK, Source

__all__ = ["FileDir", "confined"]


def confined(root: Path, path: str) -> tuple[Path | None, str]:
    """The real path of ``root/path`` if it is a regular file inside ``root``, else (None, why)."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([real_root, real]) != real_root:
        return None, f"is a symlink that leaves the source directory (to {real}); file sources follow links only inside it"
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return None, "no such file"
    except OSError as exc:
        return None, exc.strerror or str(exc)
    if not stat.S_ISREG(mode):
        return None, f"is not a regular file ({_kind(mode)}); file sources read only regular files"
    return Path(real), ""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):  # fmt: skip
        if test(mode):
            return name
    return "not a file"


class FileDir(Source):
    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self) -> str:
        return str(self.root)

    def read(self, path: str, offset: int = 0) -> Iterator[bytes]:
        if not self.root.is_dir():
            raise SourceError(f"file source {self.root}: {path}: no such directory")
        real, why = confined(self.root, path)
        if real is None:
            raise SourceError(f"file source {self.root}: {path}: {why}")
        try:
            # O_NOFOLLOW|O_NONBLOCK: what was checked above cannot turn into a link or a FIFO that blocks.
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise SourceError(f"file source {self.root}: {path}: {exc.strerror or exc}") from exc
        try:
            with open(fd, "rb", closefd=True) as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise SourceError(f"file source {self.root}: {path}: is not a regular file; file sources read only regular files")
                f.seek(offset)
                while chunk := f.read(CHUNK):
                    yield chunk
        except OSError as exc:
            raise SourceError(f"file source {self.root}: {path}: {exc.strerror or exc}") from exc
