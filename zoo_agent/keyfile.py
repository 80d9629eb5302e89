"""The one reader of key files: bearer tokens, the fleet key, a hub token (issue #31).

A key file is a path a user hands us (``--api-key-file``, ``--fleet-key-file``,
``fleet status --key-file``, ``chat --api-key-file``, ``--hf-token-file``). A FIFO hung the
command (and the resident before READY), ``/dev/zero`` was read until memory ran out, and
a 1 MiB key was accepted and then sent in every request header. Here only a regular file
is read, opened without blocking and read no further than :data:`MAX_KEY_BYTES`; a
token is one word of visible ASCII. Every refusal is one ``UsageError`` line naming the flag.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from zoo_agent.errors import UsageError

__all__ = ["MAX_KEY_BYTES", "read_key_file"]

#: A bearer token or a hub token is tens of bytes; a file larger than this holds something else.
MAX_KEY_BYTES = 4096

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}  # fmt: skip


def read_key_file(path: Path, flag: str, *, allow_empty: bool = False) -> str:
    """The token in ``path``: one word of visible ASCII (surrounding whitespace stripped).

    ``allow_empty`` returns ``""`` for a file that holds only whitespace (the hub token:
    the next place a token may come from is tried); a bearer token must never be empty,
    or auth would be off."""
    # A path is the user's bytes: a newline or an escape in it must not split or paint the line.
    where = f"{flag} {path}" if str(path).isprintable() else f"{flag} {ascii(str(path))}"
    try:
        # O_NONBLOCK: opening a FIFO nobody writes to returns at once (then it is refused),
        # where a plain open() waits for a writer forever. O_NOCTTY: a terminal is not adopted.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        why = "no such file" if exc.errno == errno.ENOENT else f"cannot be read: {exc.strerror or exc}"
        raise UsageError(f"{where}: {why}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise UsageError(f"{where}: is {kind}; a key file is a regular file holding one token")
        raw = _read_at_most(fd, MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{where}: cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_KEY_BYTES:
        raise UsageError(f"{where}: larger than {MAX_KEY_BYTES} bytes; a key file holds one token")
    try:
        key = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise UsageError(f"{where}: not ASCII; a bearer token is visible ASCII characters") from None
    if not key and not allow_empty:
        raise UsageError(f"{where}: empty; it must hold the bearer token (an empty one would turn auth off)")
    if not all(33 <= ord(c) < 127 for c in key):
        raise UsageError(f"{where}: the token holds spaces or control characters; a bearer token is one word")
    return key


def _read_at_most(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes: a bounded number of reads, since each returns at least one byte or ends."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
