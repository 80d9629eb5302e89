"""Durable writes: process-unique temp name, fsync, rename, fsync the directory.

ext4's ``auto_da_alloc`` does not cover a rename of new data, and a failed fsync cannot
be retried (the pages are already marked clean), so every writer goes through here and
abandons its temp file on any error.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import time
from contextlib import suppress
from pathlib import Path

__all__ = ["DIR_MODE", "FILE_MODE", "PUBLISHED_MODE", "flock_within", "fsync_dir", "makedirs_durable", "sweep_temps", "temp_name", "write_atomic", "write_atomic_at"]


def temp_name(target: Path) -> Path:
    """A sibling name no other process uses: two writers never share a temp file."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


# Owned by the service user, readable by its group, nothing for others (issue #10): other
# services get read access by joining the group. Published files are also read-only:
# they are mmapped by the resident and never rewritten in place.
DIR_MODE = 0o750
FILE_MODE = 0o640
PUBLISHED_MODE = 0o440

_TEMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


def sweep_temps(directory: Path) -> list[str]:
    """Remove temp files of ``write_atomic`` whose writer is dead (killed between create and
    rename); a live writer's are left alone. Returns the names removed."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False) or _alive(int(m.group(1))):
            continue
        os.unlink(entry.path)
        removed.append(entry.name)
    if removed:
        fsync_dir(directory)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(target: Path, data: bytes, mode: int | None = None) -> None:
    """Replace ``target`` with ``data`` so a reader sees the old or the new file, never half."""
    tmp = temp_name(target)
    if mode is None:
        try:
            mode = os.stat(target).st_mode & 0o7777
        except FileNotFoundError:
            mode = FILE_MODE  # state is never world-readable (issue #18)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)  # O_CREAT's mode is filtered by the umask
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_atomic_at(dir_fd: int, name: str, data: bytes, mode: int = FILE_MODE, *, replace: bool = True) -> None:
    """``write_atomic`` inside an open directory (``name`` one component: nothing is followed on the
    way to it). ``replace=False`` adds the file only where nothing is (a link, however dangling,
    counts): ``FileExistsError`` otherwise, atomically, with nothing written."""
    tmp = temp_name(Path(name)).name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        else:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)  # linkat never replaces
            os.unlink(tmp, dir_fd=dir_fd)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)


def makedirs_durable(path: Path, mode: int = DIR_MODE) -> None:
    """mkdir -p with ``mode`` at every level it creates, fsyncing each parent whose entry we created."""
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=mode)
        except FileExistsError:
            continue
        fsync_dir(directory.parent)


def flock_within(fd: int, wait: float, poll: float = 0.1) -> bool:
    """An exclusive flock on ``fd``, tried until ``wait`` seconds have passed; False if another holder kept it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
