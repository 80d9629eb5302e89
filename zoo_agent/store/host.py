"""Host state that outlives any model (issue #10): identity, the action log, imported state.

`host/` holds the host's identity and whatever application state its operators keep
there (opaque files to us); `gc` never touches it and backups always include it. A disk
that is full, read-only or refuses us ends in one line naming the file (``store_errors``,
issue #17), and every write lands by rename, so no half-written file is left.
"""

from __future__ import annotations

import json
import os
import platform
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from zoo_agent.errors import StoreError, UsageError
from zoo_agent.store.durable import DIR_MODE, FILE_MODE, makedirs_durable, write_atomic
from zoo_agent.formats import now
from zoo_agent.store.zoo import Zoo

__all__ = ["ROTATE_BYTES", "append_action", "import_state", "init_identity", "parse_since", "read_actions", "store_errors"]

ROTATE_BYTES = 4 << 20  # actions.jsonl is rotated past this size
KEEP_ROTATED = 5  # actions.jsonl.1 (newest) .. actions.jsonl.5


def _identity(name: str) -> dict[str, Any]:
    try:
        machine = Path("/etc/machine-id").read_text().strip() or platform.node()
    except OSError:
        machine = platform.node()
    return {"name": name, "id": uuid.uuid4().hex, "machine": machine, "created": now()}


@contextmanager
def store_errors(path: Path, doing: str) -> Iterator[None]:
    """An OSError (ENOSPC, EACCES, EROFS, EIO) becomes one line naming ``path`` (issue #17):
    the disk, not the user's input, failed, and a traceback would tell them nothing more."""
    try:
        yield
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror or exc} while {doing}") from exc


def init_identity(zoo: Zoo, name: str, *, force: bool = False) -> tuple[dict[str, Any], bool]:
    """(identity, created): an existing identity is kept unless ``force``; its id is what stays stable."""
    path = zoo.identity_file
    if path.exists() and not force:
        with store_errors(path, "reading the host identity"):
            text = path.read_text()
        try:
            kept = json.loads(text)
        except ValueError:
            kept = None
        if not isinstance(kept, dict):
            raise StoreError(f"{path}: not a host identity (not a JSON object); make a new one with zoo-agent host init --force")
        return kept, False
    identity = _identity(name)
    with store_errors(path, "writing the host identity"):
        makedirs_durable(path.parent, DIR_MODE)
        write_atomic(path, (json.dumps(identity, indent=2) + "\n").encode(), FILE_MODE)
    return identity, True


def import_state(zoo: Zoo, source: Path, *, force: bool) -> list[str]:
    """Copy a host state directory into `host/`; refuses to overwrite any file unless ``force``.
    Every file lands by rename, so a reader sees the old or the new file, never half."""
    if not source.is_dir():
        raise UsageError(f"--import {source}: not a directory")
    if link := next((p for p in sorted(source.rglob("*")) if p.is_symlink()), None):
        # Its target may be a file only root can read; a copy in host/ would be group-readable.
        raise UsageError(f"--import {source}: {link.relative_to(source)} is a symbolic link; only regular files are imported")
    files = sorted(p for p in source.rglob("*") if p.is_file())
    host = zoo.host_dir
    clashes = [str(p.relative_to(source)) for p in files if (host / p.relative_to(source)).exists()]
    if clashes and not force:
        raise UsageError(f"--import {source}: host/{clashes[0]} exists ({len(clashes)} files would be overwritten); pass --force")
    for path in files:
        target = host / path.relative_to(source)
        with store_errors(target, "importing host state"):
            makedirs_durable(target.parent, DIR_MODE)
            write_atomic(target, path.read_bytes(), FILE_MODE)
    return [str(p.relative_to(source)) for p in files]


def append_action(zoo: Zoo, record: dict[str, Any]) -> None:
    """One JSON line per action; rotated by size so the log never fills the disk."""
    path = zoo.actions_log
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    try:
        if path.stat().st_size >= ROTATE_BYTES:
            for n in range(KEEP_ROTATED - 1, 0, -1):
                older = path.with_name(f"{path.name}.{n}")
                if older.exists():
                    os.replace(older, path.with_name(f"{path.name}.{n + 1}"))
            os.replace(path, path.with_name(f"{path.name}.1"))
    except FileNotFoundError:
        pass
    # 0640 however it is created: open(path, "a") made it 0644 outside systemd's UMask=0027,
    # where the promise is that zoo state is never world-readable (issue #31). No link is followed.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    with os.fdopen(fd, "a") as f:
        if os.fstat(fd).st_mode & 0o777 != FILE_MODE:
            os.fchmod(fd, FILE_MODE)  # O_CREAT's mode is filtered by the umask; an older log is brought to it too
        f.write(json.dumps(record) + "\n")


def read_actions(zoo: Zoo, since: datetime | None = None) -> Iterator[dict[str, Any]]:
    """The action log, oldest first, across rotated files; unreadable lines are skipped."""
    path = zoo.actions_log
    for n in range(KEEP_ROTATED, -1, -1):
        part = path if n == 0 else path.with_name(f"{path.name}.{n}")
        try:
            lines = part.read_text().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            try:
                record = json.loads(line)
                when = datetime.fromisoformat(record["time"])
            except (ValueError, KeyError, TypeError):
                continue
            if since is None or when >= since:
                yield record


_RELATIVE = re.compile(r"(\d+)\s*([smhdw])")


def parse_since(text: str, now_: datetime | None = None) -> datetime:
    """'2026-11-21', '2026-11-21T08:00', or a span back from now: '30m', '2h', '7d', '1w'."""
    if m := _RELATIVE.fullmatch(text.strip()):
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m.group(2)]
        try:
            return (now_ or datetime.now(UTC)) - timedelta(**{unit: int(m.group(1))})
        except (OverflowError, ValueError):  # timedelta stops at 999999999 days, datetime at year 1, int() at 4300 digits
            raise UsageError(f"--since '{text}': reaches back before the year 1; use a smaller span or a date (2026-11-21)") from None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since '{text}': expected a date (2026-11-21), a time (2026-11-21T08:00) or a span (30m, 2h, 7d)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)

