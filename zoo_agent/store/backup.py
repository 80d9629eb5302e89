"""Backups of what cannot be fetched again, and restores that check every byte first (issue #10).

A backup directory holds `files/<path in the zoo>` and `backup-manifest.json` (every
file's path, size, sha256, mode; the `current`/`previous` links; the time, the host and
the digest of the index that was applied). It is incremental: a file whose size and
mtime match the previous backup's entry is not read or written again. The manifest is
written last, so a backup without one is incomplete and is never restored from.

Model files are included only on request: they can be fetched again, their manifests
(which are backed up) say exactly what to fetch.

Nothing escapes its root (issue #17). One rule: below a root we were given (the zoo, the
backup directory) every path is opened one component at a time with ``O_NOFOLLOW``, so
a link planted anywhere below is refused, naming it, never followed (``_Tree``). A
manifest is parsed by one model and one rule set (``parse_manifest``) before anything is
written: paths relative, normalized and in a place backups write; modes no wider than the
zoo's own (0750 directories, 0640 files, no setuid/setgid/sticky); links only to
``versions/<version>`` or below their own directory. A backup replaces or removes only
files its previous manifest lists, so it never deletes what it did not write.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import posixpath
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zoo_agent.errors import IntegrityError, Problem, StoreError, UsageError, ZooError
from zoo_agent.index.schema import pointer
from zoo_agent.sources.file import file_kind
from zoo_agent.store.durable import DIR_MODE, FILE_MODE, makedirs_durable, temp_name, write_atomic
from zoo_agent.store.host import store_errors
from zoo_agent.formats import now
from zoo_agent.store.zoo import MANIFEST, STAGING_MARK, Zoo, hash_file

__all__ = ["BACKUP_MANIFEST", "BackupManifest", "Summary", "backup", "check_backup", "manifest_problems", "parse_manifest", "restore"]

log = logging.getLogger("zoo_agent")

BACKUP_MANIFEST = "backup-manifest.json"
FORMAT: Literal[1] = 1
CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a planted fifo must not hang us


@dataclass(frozen=True)
class Summary:
    files: int
    bytes: int
    bytes_written: int
    skipped: tuple[str, ...] = ()  # restore: what was left for apply to fetch

    def as_dict(self) -> dict[str, Any]:
        return {"files": self.files, "bytes": self.bytes, "bytes_written": self.bytes_written, "skipped": list(self.skipped)}


# -- the manifest: one model, one rule set, used by backup, check_backup and restore --------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class BackupFile(_Strict):
    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    mode: int
    mtime_ns: int = 0


class BackupLink(_Strict):
    path: str
    target: str


class BackupDir(_Strict):
    path: str
    mode: int


class BackupManifest(_Strict):
    format: Literal[1]
    created: str = ""
    host: str = ""
    root: str = ""
    include_models: bool = False
    index_sha256: str | None = None
    files: list[BackupFile]
    links: list[BackupLink] = []
    dirs: list[BackupDir] = []


_PLACES = {
    "files": "host/…, resident/… or models|loras/<id>/versions/<version>/…",
    "dirs": "host, resident or a directory below them",
    "links": "host/…, resident/… or models|loras/<id>/current|previous",
}


def _is_temp(name: str) -> bool:
    return name.startswith(".") or STAGING_MARK in name


def _path_problem(path: str, field: str) -> str | None:
    """Why ``path`` may not be written below the zoo root, or None."""
    parts = path.split("/")
    if "\0" in path:
        return "a path with a NUL byte"
    if path.startswith("/"):
        return f"'{path}' is absolute; paths are relative to the zoo root"
    if ".." in parts:
        return f"'{path}' climbs out with '..'; paths stay inside the zoo root"
    if "." in parts or "" in parts:
        return f"'{path}' is not normalized; write '{posixpath.normpath(path)}'"
    top, n = parts[0], len(parts)
    versioned = top in ("models", "loras") and n >= 3 and parts[2] == "versions"
    placed = {
        "files": (top in ("host", "resident") and n >= 2) or (versioned and n >= 5 and not _is_temp(parts[3])),
        "dirs": top in ("host", "resident"),
        "links": (top in ("host", "resident") and n >= 2) or (top in ("models", "loras") and n == 3 and parts[2] in ("current", "previous")),
    }[field]
    return None if placed else f"'{path}' is not a place backups restore to ({_PLACES[field]})"


def _target_problem(path: str, target: str) -> str | None:
    """Links point at a version (``current``/``previous``) or below their own directory, nowhere else."""
    parts = target.split("/")
    if path.split("/")[0] in ("models", "loras"):
        ok = len(parts) == 2 and parts[0] == "versions" and parts[1] not in ("", ".", "..") and not _is_temp(parts[1])
        return None if ok else f"target '{target}' is not versions/<version>"
    if target.startswith("/") or "\0" in target or {"", ".", ".."} & set(parts):
        return f"target '{target}' leaves the link's directory; links point only below it (relative, no '..')"
    return None


def _mode_problem(mode: int, field: str) -> str | None:
    """Modes no wider than the zoo's own (store.DIR_MODE, FILE_MODE): a restore never grants more."""
    if field == "dirs":
        ok = mode & ~DIR_MODE == 0 and mode & 0o700 == 0o700
        return None if ok else f"mode {mode:04o} is not one the zoo's directories have (0700 to 0750; no setuid, setgid, sticky or access for others)"
    ok = mode & ~FILE_MODE == 0
    return None if ok else f"mode {mode:04o} is wider than the zoo's files (at most 0640; no setuid, setgid, sticky or access for others)"


def manifest_problems(manifest: BackupManifest) -> list[Problem]:
    """Every entry that would reach outside the zoo or widen its modes, by JSON pointer (issue #17)."""
    problems: list[Problem] = []
    seen: dict[str, tuple[str, str]] = {}  # path -> (pointer of its entry, field)
    entries: list[tuple[str, list[Any]]] = [("dirs", manifest.dirs), ("files", manifest.files), ("links", manifest.links)]
    for field, listed in entries:
        for i, entry in enumerate(listed):
            at = f"/{field}/{i}"
            why = _path_problem(entry.path, field)
            if why is None and entry.path in seen:
                why = f"'{entry.path}' is listed twice (also at {seen[entry.path][0]})"
            if why:
                problems.append(Problem(f"{at}/path", why))
                continue
            seen[entry.path] = (f"{at}/path", field)
            if field == "links" and (why := _target_problem(entry.path, entry.target)):
                problems.append(Problem(f"{at}/target", why))
            if field != "links" and (why := _mode_problem(entry.mode, field)):
                problems.append(Problem(f"{at}/mode", why))
    for path, (at, _field) in seen.items():  # nothing is written through a file or a link
        parts = path.split("/")
        above = next(("/".join(parts[:n]) for n in range(1, len(parts)) if seen.get("/".join(parts[:n]), ("", "dirs"))[1] != "dirs"), None)
        if above is not None:
            problems.append(Problem(at, f"'{path}' lies under {seen[above][0]} ('{above}'), which is not a directory"))
    return problems


def parse_manifest(data: bytes, file: str) -> BackupManifest:
    """The manifest, or a UsageError naming the first entry that is malformed or reaches outside the zoo."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise UsageError(Problem("", f"not JSON ({exc})").line(file)) from exc
    if not isinstance(document, dict):
        raise UsageError(Problem("", "not a JSON object").line(file))
    try:
        manifest = BackupManifest.model_validate(document)
        problems = manifest_problems(manifest)
    except ValidationError as exc:
        problems = [Problem(pointer(e["loc"]), e["msg"]) for e in exc.errors()]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UsageError(problems[0].line(file) + more)
    return manifest


# -- one confinement rule: below a root, one component at a time, never through a link --------------


@dataclass(frozen=True)
class _Tree:
    """A root we were given (followed if it is a link: the user named it) and what lies below it."""

    root: Path
    refuse: type[ZooError]  # a backup directory is input (UsageError); the zoo is the store (StoreError)
    rule: str  # the end of the refusal's line

    def refusal(self, rel: str, mode: int, wanted: str) -> ZooError:
        return self.refuse(f"{self.root / rel}: {file_kind(mode)}, not {wanted}; {self.rule}")

    @contextmanager
    def dir(self, rel: str, *, create: bool = False) -> Iterator[int]:
        """An fd for root/rel, never through a link; ``create`` makes missing levels (0750)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            done: list[str] = []
            for name in rel.split("/") if rel else []:
                if create:
                    with suppress(FileExistsError):
                        os.mkdir(name, DIR_MODE, dir_fd=fd)
                        os.fsync(fd)
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
                    raise self.refusal("/".join([*done, name]), mode, "a directory") from exc
                os.close(fd)
                fd, done = child, [*done, name]
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def reader(self, rel: str) -> Iterator[int]:
        """An fd to read root/rel from, refused unless it is a regular file (no link, fifo or device)."""
        parent, name = posixpath.split(rel)
        with self.dir(parent) as dfd:
            try:
                fd = os.open(name, _READ_FLAGS, dir_fd=dfd)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                raise self.refusal(rel, stat.S_IFLNK, "a file") from exc
            try:
                if not stat.S_ISREG(mode := os.fstat(fd).st_mode):
                    raise self.refusal(rel, mode, "a file")
                yield fd
            finally:
                os.close(fd)

    def obstacle(self, rel: str, leaf: Literal["file", "dir", "replace"]) -> ZooError | None:
        """What stands where ``rel`` would be written (a link, a file where a directory belongs), or None.
        Checked for every path before the first byte; ``dir`` and ``reader`` close the race after.
        ``replace``: anything but a directory, for a rename replaces a file or a link, never follows it."""
        parts = rel.split("/")
        for n in range(1, len(parts) + 1):
            try:
                mode = os.lstat(self.root.joinpath(*parts[:n])).st_mode
            except FileNotFoundError:
                return None  # nothing below it exists yet
            except OSError as exc:
                return StoreError(f"{self.root.joinpath(*parts[:n])}: {exc.strerror}")
            if n < len(parts) or leaf == "dir":
                if not stat.S_ISDIR(mode):
                    return self.refusal("/".join(parts[:n]), mode, "a directory")
            elif stat.S_ISDIR(mode) or (leaf == "file" and not stat.S_ISREG(mode)):
                return self.refusal(rel, mode, "a file")
        return None


def _chunks(fd: int, shown: Path, doing: str) -> Iterator[bytes]:
    with store_errors(shown, doing):
        while chunk := os.read(fd, CHUNK):
            yield chunk


def _copy_hashed(src: _Tree, src_rel: str, dst: _Tree, dst_rel: str, mode: int, doing: str,
                 expect: BackupFile | None = None) -> tuple[str, int]:  # fmt: skip
    """(sha256, size): stream one file to a unique temp name beside its target, fsync, rename;
    with ``expect``, bytes that differ from it never replace the target."""
    parent, name = posixpath.split(dst_rel)
    digest, size = hashlib.sha256(), 0
    # Each side's OSError names its own path: the innermost store_errors catches it first.
    with store_errors(src.root / src_rel, doing), src.reader(src_rel) as fin, \
         store_errors(dst.root / dst_rel, doing), dst.dir(parent, create=True) as dfd:  # fmt: skip
        tmp = temp_name(Path(name)).name  # process-unique: two writers never share a temp file
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            try:
                for chunk in _chunks(fin, src.root / src_rel, doing):
                    digest.update(chunk)
                    size += len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view):]
                os.fchmod(out, mode)
                os.fsync(out)
            finally:
                os.close(out)
            if expect is not None and (digest.hexdigest(), size) != (expect.sha256, expect.size):
                raise IntegrityError(f"{src.root / src_rel}: changed while it was being restored")
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        os.fsync(dfd)
    return digest.hexdigest(), size


def _read_manifest(directory: Path) -> bytes | None:
    """The bytes of ``directory``'s manifest (never through a link), or None when there is none."""
    tree = _Tree(directory, UsageError, "a backup's manifest is read only from a regular file")
    with store_errors(directory / BACKUP_MANIFEST, "reading the backup"):
        try:
            with tree.reader(BACKUP_MANIFEST) as fd:
                return b"".join(_chunks(fd, directory / BACKUP_MANIFEST, "reading the backup"))
        except (FileNotFoundError, NotADirectoryError):
            return None


# -- backup ------------------------------------------------------------------------------------


def _collect(zoo: Zoo, include_models: bool) -> tuple[list[str], list[BackupLink], list[BackupDir]]:
    """(files, links, directories) relative to the root: host/, resident/, every published
    manifest, and with ``include_models`` the files they describe. Modes are narrowed to the
    zoo's own and links a restore would refuse are left out (with a warning), so every backup
    restores."""
    files: list[str] = []
    links: list[BackupLink] = []
    dirs: list[BackupDir] = []

    def add_link(path: Path) -> None:
        rel, target = str(path.relative_to(zoo.root)), os.readlink(path)
        if (why := _target_problem(rel, target)) is None:
            links.append(BackupLink(path=rel, target=target))
        else:
            log.warning("not backed up: %s (%s)", zoo.root / rel, why)

    for top in ("host", "resident"):
        if (zoo.root / top).is_dir():
            dirs.append(BackupDir(path=top, mode=(zoo.root / top).stat().st_mode & DIR_MODE | 0o700))
        for path in sorted((zoo.root / top).rglob("*")):
            if _is_temp(path.name):
                continue
            if path.is_symlink():
                add_link(path)
            elif path.is_dir():
                dirs.append(BackupDir(path=str(path.relative_to(zoo.root)), mode=path.stat().st_mode & DIR_MODE | 0o700))
            elif path.is_file():
                files.append(str(path.relative_to(zoo.root)))
    for kind in ("models", "loras"):
        for artifact in sorted(p for p in (zoo.root / kind).glob("*") if p.is_dir() and not p.is_symlink()):  # not an alias link (#35)
            for name in ("current", "previous"):
                if (artifact / name).is_symlink():
                    add_link(artifact / name)
            for version in sorted(p for p in (artifact / "versions").glob("*") if p.is_dir() and not _is_temp(p.name)):
                if not (version / MANIFEST).is_file():
                    continue
                chosen = sorted(p for p in version.rglob("*") if p.is_file()) if include_models else [version / MANIFEST]
                files += [str(p.relative_to(zoo.root)) for p in chosen]
    return files, links, dirs


def _previous(dest: Path) -> dict[str, BackupFile] | None:
    """What an earlier backup in ``dest`` wrote: the only files this one may replace or remove;
    None for an empty (or new) directory, where everything the backup writes is its own."""
    with store_errors(dest, "backing up"):
        if not dest.exists():
            return None
        if not dest.is_dir():
            raise UsageError(f"--to {dest}: not a directory")
        if not any(dest.iterdir()):
            return None
    data = _read_manifest(dest)
    if data is None:
        raise UsageError(f"{dest} is not empty and holds no {BACKUP_MANIFEST}; choose an empty directory")
    return {entry.path: entry for entry in parse_manifest(data, str(dest / BACKUP_MANIFEST)).files}


_DEST_RULE = "backup never follows links in its destination (remove it, or choose an empty directory)"
_ZOO_READ_RULE = "backup reads the zoo only from regular files, never through links"


def _refuse_what_is_not_ours(out: _Tree, rels: list[str], before: dict[str, BackupFile]) -> None:
    """Before the first byte: no link on the way, and no file there that the last backup did not write."""
    for rel in rels:
        if (refused := out.obstacle(f"files/{rel}", "file")) is not None:
            raise refused
        if rel not in before and os.path.lexists(out.root / "files" / rel):
            raise UsageError(f"{out.root / 'files' / rel}: not written by an earlier backup (not in its {BACKUP_MANIFEST}); "
                             "move it away or choose an empty directory")


def _remove(out: _Tree, rel: str) -> None:
    """One file an earlier backup wrote and the zoo no longer has (unlinked, never followed)."""
    parent, name = posixpath.split(f"files/{rel}")
    with store_errors(out.root / "files" / rel, "backing up"), suppress(FileNotFoundError), out.dir(parent) as dfd:
        os.unlink(name, dir_fd=dfd)


def _unchanged(out: _Tree, old: BackupFile | None, st: os.stat_result) -> bool:
    if old is None or (old.size, old.mtime_ns, old.mode) != (st.st_size, st.st_mtime_ns, st.st_mode & FILE_MODE):
        return False
    try:
        copy = os.lstat(out.root / "files" / old.path)
    except OSError:
        return False
    return stat.S_ISREG(copy.st_mode) and copy.st_size == old.size


def backup(zoo: Zoo, dest: Path, *, host: str, include_models: bool = False) -> Summary:
    """Copy what changed since the last backup into ``dest``; the manifest goes last."""
    if dest.resolve().is_relative_to(zoo.root.resolve()):
        raise UsageError(f"--to {dest}: inside the zoo it backs up; choose another place")
    previous = _previous(dest)
    before = previous or {}
    with store_errors(zoo.root, "backing up"):
        files, links, dirs = _collect(zoo, include_models)
    out = _Tree(dest, UsageError, _DEST_RULE)
    source = _Tree(zoo.root, StoreError, _ZOO_READ_RULE)
    stale = sorted(set(before) - set(files))
    _refuse_what_is_not_ours(out, files + stale, before)
    with store_errors(dest, "backing up"):
        makedirs_durable(dest, DIR_MODE)
    for rel in [s for s in stale if any(f.startswith(f"{s}/") for f in files)]:
        _remove(out, rel)  # a file of the last backup where this one needs a directory
    entries, created, written = [], [], 0
    copies: dict[tuple[int, int], BackupFile] = {}  # a zoo inode -> its copy in this backup
    try:
        for rel in files:
            with store_errors(zoo.root / rel, "backing up"):
                st = os.lstat(zoo.root / rel)
            if _unchanged(out, before.get(rel), st):
                entries.append(before[rel])  # unchanged since the last backup: neither read nor written
                copies.setdefault((st.st_dev, st.st_ino), before[rel])
                continue
            created += [] if rel in before else [rel]
            first = copies.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None
            if first is not None and _link_copy(out, first.path, rel):
                entries.append(first.model_copy(update={"path": rel}))  # versions sharing an inode share its copy (#23)
                continue
            digest, size = _copy_hashed(source, rel, out, f"files/{rel}", st.st_mode & FILE_MODE, "backing up")
            entries.append(BackupFile(path=rel, size=size, sha256=digest, mode=st.st_mode & FILE_MODE, mtime_ns=st.st_mtime_ns))
            copies.setdefault((st.st_dev, st.st_ino), entries[-1])
            written += size
        applied = zoo.applied_index
        with store_errors(applied, "backing up"):
            index_sha256 = hashlib.sha256(applied.read_bytes()).hexdigest() if applied.is_file() else None
        manifest = BackupManifest(
            format=FORMAT, created=now(), host=host, root=str(zoo.root), include_models=include_models,
            index_sha256=index_sha256, files=entries, links=links, dirs=dirs,
        )  # fmt: skip
        with store_errors(dest / BACKUP_MANIFEST, "backing up"):
            write_atomic(dest / BACKUP_MANIFEST, (json.dumps(manifest.model_dump(mode="json"), indent=1) + "\n").encode(), FILE_MODE)
    except BaseException:
        _forget(out, created, first=previous is None)
        raise
    for rel in stale:
        _remove(out, rel)  # gone from the zoo since the last backup
    summary = Summary(len(entries), sum(e.size for e in entries), written)
    # The last backup's summary stays in the zoo (not in host/: it would change what it describes).
    with store_errors(zoo.root / BACKUP_MANIFEST, "backing up"):
        write_atomic(zoo.root / BACKUP_MANIFEST, (json.dumps({"created": manifest.created, "to": str(dest), **summary.as_dict(),
                                                             "include_models": include_models}, indent=2) + "\n").encode(), FILE_MODE)  # fmt: skip
    return summary


def _link_copy(out: _Tree, first: str, rel: str) -> bool:
    """files/rel as a hard link to files/first, this backup's copy of the same zoo inode (issue
    #23: one copy of shared bytes); False where the destination cannot link (then it is copied)."""
    src_parent, src_name = posixpath.split(f"files/{first}")
    parent, name = posixpath.split(f"files/{rel}")
    with store_errors(out.root / "files" / rel, "backing up"), out.dir(src_parent) as sfd, out.dir(parent, create=True) as dfd:
        tmp = temp_name(Path(name)).name
        try:
            os.link(src_name, tmp, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EMLINK, errno.EXDEV, errno.EOPNOTSUPP):
                return False
            raise
        _replace_at(dfd, tmp, name)
    return True


def _forget(out: _Tree, created: list[str], *, first: bool) -> None:
    """After a failed backup, remove what it wrote that no manifest lists, so the next run may write
    there again (best effort; the error that got us here is the one reported)."""
    with suppress(OSError, ZooError):
        if first:  # the directory was empty: everything below files/ is ours
            with out.dir("") as fd:
                shutil.rmtree("files", dir_fd=fd)
            return
        for rel in created:
            _remove(out, rel)


# -- check and restore ---------------------------------------------------------------------------

_BACKUP_RULE = "restore reads a backup only from regular files, never through links"
_ZOO_WRITE_RULE = "restore never writes through links in the zoo (move it away and restore again)"


def check_backup(source: Path) -> BackupManifest:
    """The backup's manifest, once it is well formed and every file in it matches; else UsageError
    (a bad manifest, a link) or IntegrityError naming the files. Nothing is written."""
    data = _read_manifest(source)
    if data is None:
        raise UsageError(f"--from {source}: no {BACKUP_MANIFEST} (not a backup, or one that did not finish)")
    manifest = parse_manifest(data, str(source / BACKUP_MANIFEST))
    tree = _Tree(source, UsageError, _BACKUP_RULE)
    damaged = []
    for entry in manifest.files:
        try:
            with tree.reader(f"files/{entry.path}") as fd:
                actual, size = hash_file(fd)
            if (actual, size) != (entry.sha256, entry.size):
                damaged.append(f"{entry.path} (sha256 {actual[:12]}…, expected {entry.sha256[:12]}…)")
        except OSError as exc:
            damaged.append(f"{entry.path} ({exc.strerror or exc})")
    if damaged:
        more = f" and {len(damaged) - 3} more" if len(damaged) > 3 else ""
        raise IntegrityError(f"{source}: {len(damaged)} damaged file(s), nothing restored: {'; '.join(damaged[:3])}{more}")
    return manifest


def _version_files(src: _Tree, version_rel: str, by_path: dict[str, BackupFile]) -> list[str] | None:
    """The paths a backed-up version's (checked) manifest lists, or None when it has none we can use."""
    if f"{version_rel}/{MANIFEST}" not in by_path:
        return None
    try:
        with src.reader(f"files/{version_rel}/{MANIFEST}") as fd:
            document = json.loads(b"".join(_chunks(fd, src.root / "files" / version_rel / MANIFEST, "restoring")))
    except (OSError, ValueError, RecursionError, ZooError):
        return None
    listed = document.get("files") if isinstance(document, dict) else None
    if not isinstance(listed, list) or not all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in listed):
        return None
    return [f["path"] for f in listed]


def _plan_restore(zoo: Zoo, src: _Tree, manifest: BackupManifest) -> tuple[list[BackupFile], dict[str, list[BackupFile]], list[str]]:
    """(files put back one by one, whole versions put back by one rename each, versions left for apply)."""
    by_path = {e.path: e for e in manifest.files}
    loose: list[BackupFile] = []
    groups: dict[str, list[BackupFile]] = {}
    for entry in manifest.files:
        parts = entry.path.split("/")
        if parts[0] in ("models", "loras"):
            groups.setdefault("/".join(parts[:4]), []).append(entry)
        else:
            loose.append(entry)
    versions: dict[str, list[BackupFile]] = {}
    skipped = []
    for version_rel, entries in sorted(groups.items()):
        if os.path.lexists(zoo.root / version_rel):
            continue  # published already, and verified when it was
        listed = _version_files(src, version_rel, by_path)
        if listed is None or any(f"{version_rel}/{path}" not in by_path for path in listed):
            skipped.append(version_rel)  # apply fetches it, from its source, as the index says
        else:
            versions[version_rel] = entries
    return loose, versions, skipped


def _put(src: _Tree, dst: _Tree, entry: BackupFile, dst_rel: str) -> int:
    """One file back from the backup, hashed again as it is copied (it was checked before, too)."""
    return _copy_hashed(src, f"files/{entry.path}", dst, dst_rel, entry.mode, "restoring", expect=entry)[1]


def _put_version(src: _Tree, dst: _Tree, version_rel: str, entries: list[BackupFile]) -> int:
    """A whole version into a staging directory of its own, then one rename: never seen half."""
    versions_rel, version = posixpath.split(version_rel)
    staging = f"{version}{STAGING_MARK}restore.{os.getpid()}.{secrets.token_hex(4)}"
    written = 0
    try:
        for entry in entries:
            written += _put(src, dst, entry, f"{versions_rel}/{staging}/{entry.path[len(version_rel) + 1:]}")
        with store_errors(dst.root / version_rel, "restoring"), dst.dir(versions_rel) as fd:
            os.rename(staging, version, src_dir_fd=fd, dst_dir_fd=fd)
            os.fsync(fd)
    except BaseException:
        with suppress(OSError, ZooError), dst.dir(versions_rel) as fd:
            shutil.rmtree(staging, dir_fd=fd)
        raise
    return written


def _lexists_below(root: Path, rel: str) -> bool:
    """Whether root/rel exists, looked up without following any link on the way."""
    parts = rel.split("/")
    try:
        return all(stat.S_ISDIR(os.lstat(root.joinpath(*parts[:n])).st_mode) for n in range(1, len(parts))) and os.path.lexists(root / rel)
    except OSError:
        return False


def _put_link(dst: _Tree, link: BackupLink) -> None:
    """A link by rename of a temporary one; skipped while what it names is absent (apply sets it)."""
    parent, name = posixpath.split(link.path)
    if not _lexists_below(dst.root, posixpath.join(parent, link.target)):
        return
    with store_errors(dst.root / link.path, "restoring"), dst.dir(parent, create=True) as fd:
        tmp = temp_name(Path(name)).name
        os.symlink(link.target, tmp, dir_fd=fd)
        _replace_at(fd, tmp, name)


def restore(zoo: Zoo, source: Path, manifest: BackupManifest) -> Summary:
    """Put each file of a checked backup (``check_backup``) back by rename; whole versions land by one rename.
    A link or a file where the backup needs a directory is refused before the first byte."""
    src = _Tree(source, UsageError, _BACKUP_RULE)
    dst = _Tree(zoo.root, StoreError, _ZOO_WRITE_RULE)
    loose, versions, skipped = _plan_restore(zoo, src, manifest)
    wanted: list[tuple[str, Literal["dir", "replace"]]] = [
        *((d.path, "dir") for d in manifest.dirs), *((e.path, "replace") for e in loose),
        *((v, "dir") for v in versions), *((link.path, "replace") for link in manifest.links),
    ]  # fmt: skip
    for rel, leaf in wanted:
        if (refused := dst.obstacle(rel, leaf)) is not None:
            raise refused
    real_root = os.path.realpath(zoo.root)
    for link in manifest.links:  # a target below the link can still lead out through a link already there
        if not os.path.realpath(zoo.root / posixpath.dirname(link.path) / link.target).startswith(real_root + os.sep):
            raise StoreError(f"{zoo.root / link.path}: target '{link.target}' leads out of the zoo through a link already there; "
                             f"{_ZOO_WRITE_RULE}")
    written = 0
    for directory in manifest.dirs:
        with store_errors(zoo.root / directory.path, "restoring"), dst.dir(directory.path, create=True):
            pass
    for entry in loose:
        written += _put(src, dst, entry, entry.path)
    for version_rel, entries in versions.items():
        written += _put_version(src, dst, version_rel, entries)
    for link in manifest.links:
        _put_link(dst, link)
    for directory in manifest.dirs:  # last: a directory's mode never stops its files going in
        with store_errors(zoo.root / directory.path, "restoring"), dst.dir(directory.path) as fd:
            os.fchmod(fd, directory.mode)
    return Summary(len(manifest.files), sum(e.size for e in manifest.files), written, tuple(skipped))


def _replace_at(dfd: int, tmp: str, name: str) -> None:
    """``tmp`` over ``name`` in one directory, durably; the temporary never outlives a failure."""
    try:
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    os.fsync(dfd)
