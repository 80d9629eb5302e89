"""Bytes the zoo already holds are reused, not fetched again (issue #23).

The index pins a sha256 for every file, so a new version that shares files with any
published one (an older version, another model's tokenizer) takes them from the zoo: a
reflink where the filesystem has them (``FICLONE``: an independent file sharing blocks),
else a hard link (the same read-only inode in both versions), else a local copy hashed
as it is written. Reuse keeps every guarantee a fetch gives:

- the origin is trusted only while its stat matches its manifest record (``drift``),
  exactly what a no-op ``apply`` trusts; with ``strict`` the bytes are re-hashed too;
- the staging copy is fsynced and published by the same rename as fetched files;
- a link or unlink moves the inode's ctime for every version sharing it, so the callers
  refresh those records (``Zoo.refresh_shared``) right after, and gc frees a shared
  inode's bytes only with its last link.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from zoo_agent.errors import SourceError, ZooError
from zoo_agent.index.model import FileEntry
from zoo_agent.sources.file import FileDir
from zoo_agent.store.durable import FILE_MODE, PUBLISHED_MODE
from zoo_agent.store.zoo import Zoo, drift, hash_file

__all__ = ["METHODS", "FICLONE", "Method", "reuse_file"]

log = logging.getLogger("zoo_agent")

Method = Literal["reflink", "hardlink", "copy"]
METHODS: tuple[Method, ...] = ("reflink", "hardlink", "copy")
FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h

# What "this filesystem or this pair of files cannot do it" looks like; anything else is a real error.
_NO_CLONE = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV, errno.ENOSYS, errno.EPERM, errno.EBADF})
_NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES, errno.EROFS, errno.EOPNOTSUPP})

#: Versions one inode is hard-linked into at most. Each link moves the ctime every sharer
#: recorded, so each costs a manifest rewrite per sharer: past this, a copy is cheaper, and
#: applying n versions of the same bytes stays linear (1000 sharers made it quadratic).
MAX_LINKS = 8


def reuse_file(zoo: Zoo, staging: Path, entry: FileEntry, origin_dir: Path, record: dict[str, Any], touched: dict[int, int], *,
               strict: bool = False, methods: tuple[Method, ...] = METHODS,
               on_bytes: Callable[[int], None] = lambda _n: None) -> Method | None:  # fmt: skip
    """Put ``entry`` into ``staging`` from the published file ``origin_dir/record['path']``.

    Returns how, or None when the origin cannot be trusted (drifted, or other bytes under
    ``strict``): the caller fetches the file instead. ``touched`` collects the inodes whose
    link count we changed, with their ctime before, for ``Zoo.refresh_shared``."""
    origin = origin_dir / record["path"]
    if (record["sha256"], record["size"]) != (entry.sha256, entry.size):
        return None
    if why := drift(origin, record):
        log.info("not reusing %s: %s since it was verified", origin, why)
        return None
    before = os.stat(origin)
    target = staging / entry.path
    target.parent.mkdir(parents=True, exist_ok=True)
    linked = _already_linked(target, before, touched)
    for method in methods:
        if method == "reflink" and not linked and _reflink(origin, target):
            return _checked(method, target, entry, strict, origin, touched)
        if method == "hardlink":
            if not linked and before.st_nlink >= MAX_LINKS:
                continue
            touched.setdefault(before.st_ino, before.st_ctime_ns)
            if linked or _hardlink(origin, target):
                return _checked(method, target, entry, strict, origin, touched)
        if method == "copy":
            try:  # the one way to copy a file in: the staging path, hashed as it is written
                zoo.stage_file(staging, entry, _Published(origin_dir, record["path"]), on_bytes)
            except (SourceError, ZooError) as exc:
                log.warning("not reusing %s: %s", origin, exc)
                return None
            return method
    return None


class _Published(FileDir):
    """One published file, read under the new version's name (a tokenizer may have another path there)."""

    def __init__(self, version_dir: Path, path: str) -> None:
        super().__init__(version_dir)
        self.path = path

    def read(self, path: str, offset: int = 0) -> Iterator[bytes]:
        return super().read(self.path, offset)


def _already_linked(target: Path, origin: os.stat_result, touched: dict[int, int]) -> bool:
    """A killed run's staging may hold the link already; anything else there is removed."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return False
    if (st.st_dev, st.st_ino) == (origin.st_dev, origin.st_ino):
        return True
    if st.st_nlink > 1:
        touched.setdefault(st.st_ino, st.st_ctime_ns)
    target.unlink()
    return False


def _checked(method: Method, target: Path, entry: FileEntry, strict: bool, origin: Path, touched: dict[int, int]) -> Method | None:
    """The staged file's size, and with ``strict`` its sha256; a mismatch is removed (the origin is damaged)."""
    st = os.lstat(target)
    if st.st_size == entry.size and (not strict or hash_file(target) == (entry.sha256, entry.size)):
        return method
    log.warning("not reusing %s: its bytes no longer match its manifest; run: zoo-agent verify", origin)
    if st.st_nlink > 1:
        touched.setdefault(st.st_ino, st.st_ctime_ns)
    target.unlink()
    return None


def _reflink(origin: Path, target: Path) -> bool:
    """An independent file sharing the origin's blocks (btrfs, XFS, bcachefs, ...), fsynced."""
    src = os.open(origin, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.ioctl(dst, FICLONE, src)
            os.fsync(dst)
        except OSError as exc:
            os.close(dst)
            target.unlink()
            if exc.errno in _NO_CLONE:
                return False
            raise
        os.close(dst)
    finally:
        os.close(src)
    os.chmod(target, PUBLISHED_MODE)
    return True


def _hardlink(origin: Path, target: Path) -> bool:
    """The same inode, already fsynced and read-only (0440) when the origin was published."""
    try:
        os.link(origin, target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _NO_LINK:
            return False
        raise
    return True
