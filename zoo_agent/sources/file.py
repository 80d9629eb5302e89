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
from zoo_agent.sources.base import CHUNK, Source

__all__ = ["FileDir", "confined", "file_kind"]


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
        return None, f"is not a regular file ({file_kind(mode)}); file sources read only regular files"
    return Path(real), ""


def file_kind(mode: int) -> str:
    """What a stat's mode is, in words, for refusals ("a FIFO", "a symbolic link", ...)."""
    kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISREG, "a file"), (stat.S_ISDIR, "a directory"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "a special file")


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
