"""Named checkpoints of a session (issue #36): its transcript and KV caches frozen under a name, and
restored as a new session that continues from the frozen cache (its first turn is not prefilled again).

They live beside the sessions, in the tenant's (or the route's) directory::

    checkpoints/.lock                   flock: every writer (the CLI, the router, a worker's timed checkpoint)
    checkpoints/<session>/_set.json     the session's checkpoints, oldest first: its set ('_' starts no name)
    checkpoints/<session>/<name>/       one checkpoint: session.json (the transcript as it was) and its caches

A checkpoint is written into a temp directory (every file fsynced), renamed into place, and only
then added to the set, whose file is replaced by temp + fsync + rename (``store/durable.py``): that
rename is the commit point, and retention (``keep``: exactly that many remain, the oldest go first)
is part of it. A SIGKILL anywhere leaves the old set or the new one; what it leaves behind (a temp
directory, a checkpoint no set names, one retention dropped) is removed by the session's next writer,
under the lock.

Caches are frozen as hard links: a cache file is only ever written by rename (``Sessions.save_cache``),
never in place, so a link keeps the bytes it had at no cost in time or space (a copy where links are
refused). The transcript and its caches need not be of the same turn: a cache is used only for the
token ids it shares with the next prompt (``Sessions.restore``), so an older or newer one costs
speed, never a wrong answer.

Below the tenant's directory every path is one component (names are checked like session ids) and
is opened without following a link: a link or a non-directory planted where a directory of ours
belongs is refused, a planted file where a cache or transcript is read is skipped or refused, and
nothing is ever written, renamed or removed through one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zoo_agent.errors import SessionError, StoreError
from zoo_agent.formats import now
from zoo_agent.index.schema import pointer
from zoo_agent.jsonbound import JSONRefused, loads
from zoo_agent.resident.sessions.transcript import MAX_SESSION_BYTES, SESSION_ID, SessionDamaged, SessionFile, parse_session, valid_id
from zoo_agent.store.durable import DIR_MODE, FILE_MODE, flock_within, temp_name, write_atomic_at

__all__ = ["CheckpointBusy", "CheckpointError", "CheckpointExists", "CheckpointNotFound", "CheckpointPolicy", "CheckpointRecord",
           "Checkpoints", "default_name", "retained", "valid_name"]  # fmt: skip

log = logging.getLogger("zoo_agent.resident")

SET = "_set.json"
TRANSCRIPT = "session.json"
#: Most checkpoints one session keeps (the index's ``checkpoints.keep`` is at most this).
MAX_KEEP = 1000
#: A set file of ``MAX_KEEP`` records is far below this.
MAX_SET_BYTES = 1 << 20
#: How long a writer waits for another's lock before it answers "busy".
LOCK_WAIT = 10.0

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a planted fifo must not hang us
_Id = Annotated[str, Field(pattern=f"^{SESSION_ID.pattern}$")]


class CheckpointError(SessionError):
    """A checkpoint that cannot be made, found or restored; one line. ``status``: the HTTP answer."""

    status = 400
    code: str | None = None


class CheckpointNotFound(CheckpointError):
    status, code = 404, "checkpoint_not_found"


class CheckpointExists(CheckpointError):
    status, code = 409, "checkpoint_exists"


class CheckpointBusy(CheckpointError):
    status, code = 503, "checkpoint_busy"
    exit_code = 75  # another writer holds the lock, as LockHeld


class CheckpointRecord(BaseModel):
    """One checkpoint as its session's set names it."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    name: _Id
    session: _Id
    created: str = Field(max_length=40)
    turns: int = Field(ge=0)
    kind: Literal["manual", "timed"] = "manual"
    caches: int = Field(default=0, ge=0)  # KV cache files frozen with it


class CheckpointSet(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    session: _Id
    checkpoints: list[CheckpointRecord] = Field(max_length=MAX_KEEP)


@dataclass(frozen=True)
class CheckpointPolicy:
    """The index's ``sessions.checkpoints``: how many each session keeps, and every how many seconds one is taken on its own."""

    keep: int = 10
    every: float | None = None


def valid_name(name: str) -> str:
    """A checkpoint's name is one path component, checked as a session id is (``../x`` is none)."""
    if not isinstance(name, str) or not SESSION_ID.fullmatch(name):
        raise CheckpointError(f"checkpoint: {repr(str(name)[:80])[:100]} is not a checkpoint name (letters, digits, '_', '-', '.'; at most 64)")
    return name


def default_name(sid: str, stamp: str) -> str:
    """``<session>.<UTC time>``: sorts by time, and fits a name (64)."""
    return f"{sid[:40]}.{stamp.replace('-', '').replace(':', '')}"[:64]


def retained(records: list[CheckpointRecord], keep: int) -> tuple[list[CheckpointRecord], list[CheckpointRecord]]:
    """(kept, dropped): exactly the newest ``keep`` remain (the set is oldest first)."""
    cut = max(0, len(records) - keep)
    return records[cut:], records[:cut]


def _cache_suffix(sid: str, name: str) -> str | None:
    """``.safetensors`` or ``+<key>.safetensors`` when ``name`` is a cache of session ``sid`` (as ``store.cache_files``), else None."""
    if name == f"{sid}.safetensors":
        return ".safetensors"
    if name.startswith(f"{sid}+") and name.endswith(".safetensors") and "/" not in name:
        return name[len(sid) :]
    return None


class Checkpoints:
    """The checkpoints of one tenant's sessions, or one route's (``base``: ``resident/tenants/<t>/`` or ``resident/routes/<r>/``).
    ``route``: its sessions are committed under the sessions directory's lock, which a checkpoint takes too."""

    def __init__(self, base: Path, *, route: bool = False, wait: float = LOCK_WAIT) -> None:
        self.base, self.route, self.wait = base, route, wait

    # -- reading --------------------------------------------------------------------------
    def listed(self, sid: str | None = None) -> tuple[list[CheckpointRecord], list[dict[str, str]]]:
        """Every checkpoint (of session ``sid``), oldest first per session, and the sets that are damaged (reported, skipped)."""
        records: list[CheckpointRecord] = []
        damaged: list[dict[str, str]] = []
        if not self.base.is_dir():  # no session was ever kept here
            return [], []
        with self._failing("listing checkpoints"), self._root() as base, _opened(base, "checkpoints", self.base) as cdir:
            if cdir is None:
                return [], []
            for session in [valid_id(sid)] if sid is not None else sorted(os.listdir(cdir)):
                if not SESSION_ID.fullmatch(session):
                    continue
                try:
                    with _opened(cdir, session, self.base / "checkpoints") as sdir:
                        records += self._set(sdir, session) if sdir is not None else []
                except SessionError as exc:
                    log.warning("%s; skipped", exc)
                    damaged.append({"file": str(self.base / "checkpoints" / session / SET), "error": str(exc)})
        return records, damaged

    def due(self, sid: str, every: float, started: str | None) -> bool:
        """Whether a timed checkpoint is due: the session's newest checkpoint (else its start) is ``every`` seconds old."""
        records, _ = self.listed(sid)
        since = records[-1].created if records else started
        return since is None or _age(since) >= every

    # -- writing --------------------------------------------------------------------------
    def create(self, sid: str, name: str | None = None, *, keep: int, kind: Literal["manual", "timed"] = "manual") -> tuple[CheckpointRecord, list[str]]:
        """Freeze session ``sid`` under ``name`` (default: the session and the time); the record and the names retention dropped."""
        valid_id(sid)
        if name is not None:
            valid_name(name)
        keep = max(1, min(keep, MAX_KEEP))
        with self._failing(f"checkpointing session '{sid}'"), self._root(f"session '{sid}' does not exist") as base, \
                self._dir(base, "checkpoints", create=True) as cdir, self._locked(cdir):  # fmt: skip
            stamp = now()
            name = name or _unused(cdir, default_name(sid, stamp))
            if (owner := _owner(cdir, name, self.base)) is not None:
                raise CheckpointExists(f"checkpoint '{name}' exists (of session '{owner}'); choose another --name")
            with self._dir(cdir, sid, create=True, shown=self.base / "checkpoints") as sdir:
                current = self._set(sdir, sid)
                _sweep(sdir, {r.name for r in current})  # what a killed writer left
                tmp = temp_name(Path(name)).name
                os.mkdir(tmp, DIR_MODE, dir_fd=sdir)
                try:
                    with _opened(sdir, tmp, self.base) as tdir:
                        assert tdir is not None
                        turns, caches = self._freeze(base, sid, tdir)
                        os.fsync(tdir)
                    os.rename(tmp, name, src_dir_fd=sdir, dst_dir_fd=sdir)
                except BaseException:
                    with suppress(OSError):
                        shutil.rmtree(tmp, dir_fd=sdir)
                    raise
                os.fsync(sdir)
                record = CheckpointRecord(name=name, session=sid, created=stamp, turns=turns, kind=kind, caches=caches)
                kept, dropped = retained([*current, record], keep)
                self._write_set(sdir, sid, kept)  # the commit point
                for gone in dropped:
                    _remove(sdir, gone.name)
        return record, [r.name for r in dropped]

    def restore(self, name: str, new_id: str | None = None) -> tuple[str, CheckpointRecord]:
        """A new session made from checkpoint ``name`` (default id: its session's, and 8 random hex digits); its caches restored with it."""
        valid_name(name)
        if new_id is not None:
            valid_id(new_id)
        with self._failing(f"restoring checkpoint '{name}'"), self._root(f"checkpoint '{name}' does not exist") as base, \
                _opened(base, "checkpoints", self.base) as cdir:  # fmt: skip
            if cdir is None:
                raise CheckpointNotFound(f"checkpoint '{name}' does not exist")
            with self._locked(cdir):
                record = self._find(cdir, name)
                sid = record.session
                new_id = new_id or f"{sid[:55]}-{secrets.token_hex(4)}"
                with self._dir(cdir, sid, shown=self.base / "checkpoints") as sdir, self._dir(sdir, name, shown=self.base / "checkpoints" / sid) as ddir:
                    frozen = _read(ddir, TRANSCRIPT, self.base / "checkpoints" / sid / name)
                    if frozen is None:
                        raise CheckpointError(f"{self.base / 'checkpoints' / sid / name / TRANSCRIPT}: missing; the checkpoint is damaged")
                    transcript = parse_session(frozen, str(self.base / "checkpoints" / sid / name / TRANSCRIPT))
                    if transcript.id != sid:
                        raise SessionDamaged(str(self.base / "checkpoints" / sid / name / TRANSCRIPT), "/id", f"is '{transcript.id}', not '{sid}'")
                    with self._dir(base, "sessions", create=True) as sessions, self._session_lock(sessions):
                        if _exists(sessions, f"{new_id}.json"):
                            raise CheckpointExists(f"session '{new_id}' exists; choose another --as")
                        self._thaw(base, ddir, sid, new_id)  # the caches first: the session's first turn finds them
                        stamp = now()
                        document = {**transcript.document(), "id": new_id, "created": stamp, "updated": stamp, "restored_from": f"{sid}/{name}"}
                        data = (json.dumps(document, indent=1) + "\n").encode()
                        try:
                            write_atomic_at(sessions, f"{new_id}.json", data, FILE_MODE, replace=False)
                        except FileExistsError:
                            raise CheckpointExists(f"session '{new_id}' exists; choose another --as") from None
        return new_id, record

    def delete(self, name: str) -> CheckpointRecord:
        """Remove checkpoint ``name`` from its session's set, then its files."""
        valid_name(name)
        with self._failing(f"deleting checkpoint '{name}'"), self._root(f"checkpoint '{name}' does not exist") as base, \
                _opened(base, "checkpoints", self.base) as cdir:  # fmt: skip
            if cdir is None:
                raise CheckpointNotFound(f"checkpoint '{name}' does not exist")
            with self._locked(cdir):
                record = self._find(cdir, name)
                with self._dir(cdir, record.session, shown=self.base / "checkpoints") as sdir:
                    self._write_set(sdir, record.session, [r for r in self._set(sdir, record.session) if r.name != name])
                    _remove(sdir, name)
        return record

    # -- the parts ------------------------------------------------------------------------
    def _freeze(self, base: int, sid: str, into: int) -> tuple[int, int]:
        """The transcript and the caches of ``sid`` into directory ``into``: (turns, caches)."""
        with _opened(base, "sessions", self.base) as sessions:
            if sessions is None:
                raise CheckpointNotFound(f"session '{sid}' does not exist")
            with self._session_lock(sessions):
                return self._freeze_locked(base, sessions, sid, into)

    def _freeze_locked(self, base: int, sessions: int, sid: str, into: int) -> tuple[int, int]:
        raw = _read(sessions, f"{sid}.json", self.base / "sessions")
        if raw is None:
            raise CheckpointNotFound(f"session '{sid}' does not exist")
        shown = str(self.base / "sessions" / f"{sid}.json")
        transcript = parse_session(raw, shown)
        if transcript.id != sid:
            raise SessionDamaged(shown, "/id", f"is '{transcript.id}', but the file is {sid}.json")
        write_atomic_at(into, TRANSCRIPT, raw, FILE_MODE, replace=False)
        caches = 0
        with _opened(base, "kv-cache", self.base) as kv:
            for entry in sorted(os.listdir(kv)) if kv is not None else []:
                if kv is not None and _cache_suffix(sid, entry) is not None and _link_file(kv, entry, into, entry, self.base / "kv-cache"):
                    caches += 1
        return len(transcript.turns), caches

    def _thaw(self, base: int, frozen: int, sid: str, new_id: str) -> None:
        """The frozen caches of ``sid`` as caches of ``new_id`` (each by rename: a cache there, of no session, is replaced)."""
        names = [(e, s) for e in sorted(os.listdir(frozen)) if (s := _cache_suffix(sid, e)) is not None]
        if not names:
            return
        with self._dir(base, "kv-cache", create=True) as kv:
            for entry, suffix in names:
                tmp = temp_name(Path(new_id + suffix)).name
                if _link_file(frozen, entry, kv, tmp, self.base / "checkpoints" / sid):
                    try:
                        os.replace(tmp, new_id + suffix, src_dir_fd=kv, dst_dir_fd=kv)
                    except BaseException:
                        with suppress(OSError):
                            os.unlink(tmp, dir_fd=kv)
                        raise
            os.fsync(kv)

    def _find(self, cdir: int, name: str) -> CheckpointRecord:
        """The record of checkpoint ``name``, from the set that names it."""
        for session in sorted(os.listdir(cdir)):
            if not SESSION_ID.fullmatch(session) or not _exists_at(cdir, session, name):
                continue
            with _opened(cdir, session, self.base / "checkpoints") as sdir:
                found = [r for r in self._set(sdir, session) if r.name == name] if sdir is not None else []
            if found:
                return found[0]
        raise CheckpointNotFound(f"checkpoint '{name}' does not exist")

    def _set(self, sdir: int, sid: str) -> list[CheckpointRecord]:
        return _read_set(sdir, sid, self.base)

    def _write_set(self, sdir: int, sid: str, records: list[CheckpointRecord]) -> None:
        data = CheckpointSet(session=sid, checkpoints=records).model_dump_json(indent=1) + "\n"
        write_atomic_at(sdir, SET, data.encode(), FILE_MODE)

    @contextmanager
    def _root(self, missing: str = "no sessions here yet") -> Iterator[int]:
        """The tenant's (route's) directory, as the zoo names it (followed: the zoo's own path); ``CheckpointNotFound(missing)`` when there is none."""
        try:
            fd = os.open(self.base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CheckpointNotFound(missing) from None
        try:
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def _failing(self, doing: str) -> Iterator[None]:
        """An OSError of the store (a full disk, a permission) as one line naming what and where; the rest as they are."""
        try:
            yield
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            raise StoreError(f"{self.base}: {doing}: {exc.strerror or exc}{where}") from exc

    @contextmanager
    def _dir(self, parent: int, name: str, *, create: bool = False, shown: Path | None = None) -> Iterator[int]:
        """Directory ``name`` below ``parent``, never through a link; missing: made (``create``) or not found."""
        where = (shown or self.base) / name
        if create:
            with suppress(FileExistsError):
                os.mkdir(name, DIR_MODE, dir_fd=parent)
                os.fsync(parent)
        with _opened(parent, name, shown or self.base) as fd:
            if fd is None:
                raise CheckpointNotFound(f"{where}: does not exist")
            yield fd

    @contextmanager
    def _locked(self, cdir: int) -> Iterator[None]:
        with _flock(cdir, ".lock", self.wait, self.base / "checkpoints"):
            yield

    @contextmanager
    def _session_lock(self, sessions: int) -> Iterator[None]:
        """A route's sessions are committed under their directory's lock (``store.session_lock``): a copy taken under it is one commit's."""
        if not self.route:
            yield
            return
        with _flock(sessions, ".lock", self.wait, self.base / "sessions"):
            yield


# -- one component at a time, never through a link ----------------------------------------------


@contextmanager
def _opened(parent: int, name: str, shown: Path) -> Iterator[int | None]:
    """An fd for directory ``name`` in ``parent``, None when there is none; a link or a non-directory there is refused."""
    try:
        fd = os.open(name, _DIR, dir_fd=parent)
    except FileNotFoundError:
        yield None
        return
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise StoreError(f"{shown / name}: {exc.strerror}") from exc
        raise _refusal(parent, name, shown, "a directory") from exc
    try:
        yield fd
    finally:
        os.close(fd)


def _refusal(parent: int, name: str, shown: Path, wanted: str) -> CheckpointError:
    mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
    kind = "a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode) else "a file" if stat.S_ISREG(mode) else "a special file"
    error = CheckpointError(f"{shown / name}: {kind}, not {wanted}; refused (nothing is read or written through it)")
    error.status, error.code = 409, "unsafe_path"
    return error


def _read(parent: int, name: str, shown: Path, limit: int = MAX_SESSION_BYTES) -> bytes | None:
    """The bytes of regular file ``name`` (None when there is none); a link, fifo or device there is refused."""
    try:
        fd = os.open(name, _READ, dir_fd=parent)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise StoreError(f"{shown / name}: {exc.strerror}") from exc
        raise _refusal(parent, name, shown, "a file") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _refusal(parent, name, shown, "a file")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise SessionDamaged(str(shown / name), "", f"larger than {limit >> 20} MiB")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _link_file(src_dir: int, name: str, dst_dir: int, dst_name: str, shown: Path) -> bool:
    """Regular file ``name`` hard-linked (else copied) as ``dst_name`` (new), data fsynced; False for what is no regular file (logged, skipped)."""
    try:
        fd = os.open(name, _READ, dir_fd=src_dir)
    except OSError as exc:
        log.warning("%s: %s; not frozen", shown / name, "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror)
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            log.warning("%s: not a regular file; not frozen", shown / name)
            return False
        os.fsync(fd)  # a cache is renamed into place without one: its bytes must be on disk before a checkpoint names them
        try:  # the inode we opened (not whatever the name holds by now): linkat through /proc's link to the fd
            os.link(f"/proc/self/fd/{fd}", dst_name, dst_dir_fd=dst_dir, follow_symlinks=True)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOENT, errno.EOPNOTSUPP, errno.EACCES):
                raise
            _copy(fd, dst_dir, dst_name)
        return True
    finally:
        os.close(fd)


def _copy(fd: int, dst_dir: int, dst_name: str) -> None:
    out = os.open(dst_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE, dir_fd=dst_dir)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        while chunk := os.read(fd, 1 << 20):
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view) :]
        os.fsync(out)
    except BaseException:
        os.close(out)
        with suppress(OSError):
            os.unlink(dst_name, dir_fd=dst_dir)
        raise
    os.close(out)


def _exists(parent: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _exists_at(cdir: int, session: str, name: str) -> bool:
    """Whether session directory ``session`` (not a link: then it holds nothing of ours) has an entry ``name``."""
    try:
        fd = os.open(session, _DIR, dir_fd=cdir)
    except OSError:
        return False
    try:
        return _exists(fd, name)
    finally:
        os.close(fd)


def _read_set(sdir: int, sid: str, base: Path) -> list[CheckpointRecord]:
    """The session's set (none yet: empty); ``SessionDamaged`` naming the file when it is no set."""
    shown = str(base / "checkpoints" / sid / SET)
    raw = _read(sdir, SET, base / "checkpoints" / sid, limit=MAX_SET_BYTES)
    if raw is None:
        return []
    try:
        document = CheckpointSet.model_validate(loads(raw))
    except JSONRefused as exc:
        raise SessionDamaged(shown, "", f"not JSON: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        raise SessionDamaged(shown, pointer(first["loc"]), first["msg"]) from exc
    if document.session != sid or any(r.session != sid for r in document.checkpoints):
        raise SessionDamaged(shown, "/session", f"names another session than '{sid}'")
    return list(document.checkpoints)


def _owner(cdir: int, name: str, base: Path) -> str | None:
    """The session whose set names checkpoint ``name`` (names are the tenant's, not a session's), or None."""
    for session in sorted(os.listdir(cdir)):
        if SESSION_ID.fullmatch(session) and _exists_at(cdir, session, name):
            with suppress(SessionError), _opened(cdir, session, base / "checkpoints") as sdir:
                if sdir is not None and name in {r.name for r in _read_set(sdir, session, base)}:
                    return session
    return None


def _unused(cdir: int, name: str) -> str:
    """A default name that is free: two checkpoints in the same millisecond get a suffix."""
    for session in os.listdir(cdir):
        if SESSION_ID.fullmatch(session) and _exists_at(cdir, session, name):
            return f"{name[:55]}-{secrets.token_hex(4)}"
    return name


def _sweep(sdir: int, listed: set[str]) -> None:
    """Remove what no set names: a killed writer's temp directory or set file, a checkpoint added or dropped before its set was."""
    for entry in os.listdir(sdir):
        if entry != SET and entry != ".lock" and entry not in listed:
            _remove(sdir, entry)


def _remove(sdir: int, name: str) -> None:
    """Directory ``name`` in ``sdir`` and what is in it (rmtree's own fd walk: no link is followed); a file or link there: unlinked."""
    try:
        mode = os.stat(name, dir_fd=sdir, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(name, dir_fd=sdir)
    else:
        os.unlink(name, dir_fd=sdir)


@contextmanager
def _flock(parent: int, name: str, wait: float, shown: Path) -> Iterator[None]:
    """An exclusive flock of file ``name`` in ``parent``, waited for at most ``wait`` seconds."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, FILE_MODE, dir_fd=parent)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise StoreError(f"{shown / name}: {exc.strerror}") from exc
        raise _refusal(parent, name, shown, "a lock file") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _refusal(parent, name, shown, "a lock file")
        if not flock_within(fd, wait, poll=0.05):
            raise CheckpointBusy(f"{shown / name}: held by another writer for {wait:g}s; try again")
        yield
    finally:
        os.close(fd)


def _age(stamp: str) -> float:
    """Seconds since ``stamp`` (``formats.now``'s form); an unreadable one counts as long ago."""
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        current = datetime.fromisoformat(now().replace("Z", "+00:00"))
    except ValueError:
        return float("inf")
    return (current - then).total_seconds()
