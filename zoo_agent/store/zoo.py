"""The zoo on disk: stage, verify, publish, swap, remove, lock (issue #3).

Layout::

    $ROOT/.lock
    $ROOT/host/actions.jsonl
    $ROOT/{models,loras}/<id>/versions/<version>/          complete, verified, manifest.json
    $ROOT/{models,loras}/<id>/versions/<version>.tmp.<pid>.<rand>/   staging, ours alone
    $ROOT/{models,loras}/<id>/{current,previous} -> versions/<version>
    $ROOT/quarantine/<kind>/<id>/<version>.<time>/       moved aside by verify --repair

Readers resolve ``current`` and so only ever see complete, verified versions: a version
directory appears by ``rename`` after every byte, file and directory was fsynced, and
``current`` moves by renaming a temporary symlink over it (hf's refs do the same).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from zoo_agent import jsonbound
from zoo_agent.errors import IntegrityError, LockHeld, StoreError, UsageError
from zoo_agent.formats import human_bytes, now
from zoo_agent.index.digest import version_digest
from zoo_agent.index.model import ID_PATTERN, FileEntry
from zoo_agent.plan import Kind, Want
from zoo_agent.sources import Source
from zoo_agent.store.durable import (
    DIR_MODE,
    FILE_MODE,
    PUBLISHED_MODE,
    fsync_dir,
    makedirs_durable,
    sweep_temps,
    temp_name,
    write_atomic,
)

__all__ = [
    "MANIFEST", "NETWORK_FILESYSTEMS", "Zoo", "declared_facts", "drift", "file_record", "hash_file", "manifest_digest", "now",
    "read_manifest", "set_mode", "shared_inodes", "write_manifest",
]  # fmt: skip

log = logging.getLogger("zoo_agent")

MANIFEST = "manifest.json"
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "ceph", "glusterfs", "fuse.sshfs", "afs"})
STAGING_MARK = ".tmp."
CONFIG_LIMIT = 1 << 20  # a model's config.json is a few kB; declared_facts reads no more


def hash_file(path: Path | int) -> tuple[str, int]:
    """(sha256, size) of a file (or an open descriptor, read to its end and left open),
    streamed; hashlib releases the GIL, so threads scale."""
    digest = hashlib.sha256()
    size = _hash_into(path, digest)
    return digest.hexdigest(), size


@dataclass(frozen=True)
class Zoo:
    root: Path

    # -- layout --------------------------------------------------------------------
    def artifact_dir(self, kind: Kind, aid: str) -> Path:
        return self.root / kind / aid

    def version_dir(self, kind: Kind, aid: str, version: str) -> Path:
        return self.artifact_dir(kind, aid) / "versions" / version

    @property
    def host_dir(self) -> Path:
        """Host-level state: survives tenant changes, never touched by gc."""
        return self.root / "host"

    @property
    def identity_file(self) -> Path:
        return self.host_dir / "identity.json"

    @property
    def applied_index(self) -> Path:
        """The index the zoo last matched (backups carry it)."""
        return self.host_dir / "applied-index.json"

    @property
    def actions_log(self) -> Path:
        return self.host_dir / "actions.jsonl"

    @property
    def resident_dir(self) -> Path:
        return self.root / "resident"

    @property
    def resident_state(self) -> Path:
        """What the supervisor serves now, for `zoo-agent resident reload` and status."""
        return self.resident_dir / "state.json"

    def tenant_dir(self, tenant: str) -> Path:
        """A tenant's resident state: model-info.json, lease.json, sessions/, kv-cache/."""
        return self.resident_dir / "tenants" / tenant

    @property
    def aliases_record(self) -> Path:
        """The alias links apply made (issue #35): the only ones it ever replaces or removes."""
        return self.host_dir / "aliases.json"

    def route_dir(self, route: str) -> Path:
        """A route's sessions (issue #21): conversations that move between its tenants' models."""
        return self.resident_dir / "routes" / route

    # -- reading, for programs on the host (issue #18) --------------------------------
    def current(self, kind: str, aid: str, *, strict: bool | None = None) -> Path:
        """The verified directory of the current version of a model or lora.

        Raises, naming the command that fixes it, when there is none or a file drifted;
        ``strict`` (default: $ZOO_STRICT) re-hashes every file as the resident does."""
        kinds: dict[str, Kind] = {"model": "models", "models": "models", "lora": "loras", "loras": "loras"}
        if kind not in kinds:
            raise UsageError(f"kind {kind!r}: expected 'model' or 'lora'")
        plural = kinds[kind]
        if plural == "models":
            aid = self.resolve_alias(aid)
        version = self.read_link(plural, aid, "current")
        if version is None:
            raise StoreError(f"{self.artifact_dir(plural, aid)}: no current version; run: zoo-agent apply")
        vdir = self.version_dir(plural, aid, version)
        manifest = read_manifest(vdir)
        if manifest is None:
            raise IntegrityError(f"{vdir}: no readable manifest; run: zoo-agent verify --repair {aid}", file=str(vdir / MANIFEST))
        rehash = strict if strict is not None else os.environ.get("ZOO_STRICT", "").lower() in ("1", "true", "yes")
        for f in manifest["files"]:
            path = vdir / f["path"]
            if why := drift(path, f):
                raise IntegrityError(f"{path}: {why} since it was verified; run: zoo-agent verify {aid}", file=f["path"])
            if rehash and hash_file(path) != (f["sha256"], f["size"]):
                raise IntegrityError(f"{path}: sha256 differs from the manifest; run: zoo-agent verify --repair {aid}",
                                     file=f["path"], expected=f["sha256"])  # fmt: skip
        return vdir

    def resolve_alias(self, name: str) -> str:
        """The model id ``name`` names: itself, or the id an alias link apply made points at (issue #35).
        Only links recorded in host/aliases.json count, and only to a sibling id: never a path elsewhere."""
        path = self.root / "models" / name
        if "/" in name or name in (".", "..") or not path.is_symlink():
            return name
        target = _alias_target(path) if name in self.recorded_aliases() else None
        if target is None:
            raise StoreError(f"{path}: is a link the zoo did not make; remove it, or name the model by its id")
        return target

    # -- aliases (issue #35) -------------------------------------------------------
    def recorded_aliases(self) -> dict[str, str]:
        """alias -> model id, as host/aliases.json records the links apply made."""
        try:
            doc = jsonbound.loads(self.aliases_record.read_bytes(), limit=1 << 20)
        except (OSError, ValueError):
            return {}
        models = doc.get("models") if isinstance(doc, dict) else None
        if not isinstance(models, dict):
            return {}
        return {k: v for k, v in models.items() if isinstance(v, str) and _ALIAS_NAME.match(k) and _ALIAS_NAME.match(v)}

    def alias_links(self, names: Iterable[str]) -> dict[str, str | None]:
        """What ``models/<name>`` is now, for each name given and each alias recorded: the id a
        link apply made names, "" when nothing is there, None when something it did not make is."""
        recorded = self.recorded_aliases()
        present: dict[str, str | None] = {}
        for name in sorted(set(names) | set(recorded)):
            path = self.root / "models" / name
            if not os.path.lexists(path):
                present[name] = ""
            else:
                present[name] = _alias_target(path) if name in recorded else None
        return present

    def link_alias(self, name: str, target: str) -> None:
        """Point ``models/<name>`` at ``models/<target>`` (a relative link, replaced atomically). Refuses,
        changing nothing, when anything but a link apply made is there: a directory is never replaced."""
        if not (_ALIAS_NAME.match(name) and _ALIAS_NAME.match(target)):
            raise UsageError(f"alias {name!r} -> {target!r}: not model ids")
        models = self.root / "models"
        path = models / name
        recorded = self.recorded_aliases()
        if os.path.lexists(path) and (name not in recorded or _alias_target(path) is None):
            raise StoreError(f"{path}: exists and the zoo did not make it; nothing there was changed. "
                             "Move it away (or run zoo-agent gc if it is an old model) or rename the alias")  # fmt: skip
        # The record first: a kill in between leaves a record of a link not made yet, never a link we forget.
        self._record_aliases({**recorded, name: target})
        makedirs_durable(models, DIR_MODE)
        tmp = temp_name(path)
        os.symlink(target, tmp)
        try:
            if os.path.lexists(path) and _alias_target(path) is None:  # taken since the check above: leave it
                raise StoreError(f"{path}: appeared while linking the alias; nothing there was changed")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(models)

    def unlink_alias(self, name: str) -> None:
        """Remove ``models/<name>`` if it is a link apply made; anything else there stays."""
        recorded = self.recorded_aliases()
        path = self.root / "models" / name
        if name in recorded and _alias_target(path) is not None:
            path.unlink()
            fsync_dir(path.parent)
        elif os.path.lexists(path):
            log.warning("%s: not an alias link the zoo made; left as it is", path)
        self._record_aliases({k: v for k, v in recorded.items() if k != name})

    def _record_aliases(self, aliases: Mapping[str, str]) -> None:
        makedirs_durable(self.host_dir, DIR_MODE)
        write_atomic(self.aliases_record, (json.dumps({"models": dict(sorted(aliases.items()))}, indent=2) + "\n").encode(), FILE_MODE)

    # -- safety checks -------------------------------------------------------------
    def check_root(self, *, allow_network_fs: bool = False, create: bool = False) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"{self.root}: the zoo root exists but is not a directory")
        if not self.root.exists():
            if not create:
                return
            try:
                self.root.mkdir(parents=True, mode=DIR_MODE)
            except FileExistsError:
                # Another run made it in between (two first requests fetching at once): fine if it is a directory.
                if not self.root.is_dir():
                    raise UsageError(f"{self.root}: the zoo root exists but is not a directory") from None
            except OSError as exc:
                raise StoreError(f"{self.root}: cannot create the zoo root: {exc.strerror}") from exc
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise StoreError(f"{self.root}: cannot read the zoo root: permission denied")
        fstype = filesystem_type(self.root)
        if fstype in NETWORK_FILESYSTEMS and not allow_network_fs:
            raise UsageError(
                f"{self.root}: is on a network filesystem ({fstype}), where locks and renames are not "
                "trustworthy; use a local disk or pass --allow-network-fs"
            )

    @contextmanager
    def lock(self, wait: float = 0.0) -> Iterator[None]:
        """One writer per root; ``wait`` seconds for another run to finish, then LockHeld."""
        if not self.root.is_dir():
            raise UsageError(f"{self.root}: no zoo here (run zoo-agent apply first, or pass --root)")
        try:
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
        except OSError as exc:
            raise StoreError(f"{self.root / '.lock'}: cannot take the zoo's lock: {exc.strerror or exc} "
                             "(the zoo root must be writable by this user; see --root)") from exc
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockHeld(f"{self.root}: another zoo-agent run holds the lock; retry, or pass --wait SECONDS") from None
                    time.sleep(0.1)
            yield  # the lock file is never written: a refused run leaves the tree byte-identical
        finally:
            os.close(fd)

    # -- writing a version -----------------------------------------------------------
    def new_staging(self, kind: Kind, aid: str, version: str) -> Path:
        if self.artifact_dir(kind, aid).is_symlink():  # an alias link, or planted: never written through (issue #35)
            raise StoreError(f"{self.artifact_dir(kind, aid)}: is a link, not the artifact's directory; nothing is written through it")
        versions = self.artifact_dir(kind, aid) / "versions"
        makedirs_durable(versions, DIR_MODE)
        staging = versions / f"{version}{STAGING_MARK}{os.getpid()}.{secrets.token_hex(4)}"
        staging.mkdir(mode=DIR_MODE)
        return staging

    def adopt_staging(self, kind: Kind, aid: str, name: str, version: str) -> Path:
        """Take over a killed run's staging directory under a name of our own (we hold the lock)."""
        versions = self.artifact_dir(kind, aid) / "versions"
        ours = versions / f"{version}{STAGING_MARK}{os.getpid()}.{secrets.token_hex(4)}"
        os.rename(versions / name, ours)
        return ours

    def staged_bytes(self, staging: Path) -> int:
        return _tree_size(staging)

    def preflight_space(self, staging: Path, need: int) -> None:
        st = os.statvfs(staging)
        free = st.f_bavail * st.f_frsize
        if need > free:
            raise StoreError(f"{staging.parent}: not enough free space: need {human_bytes(need)}, {human_bytes(free)} free")

    def stage_file(self, staging: Path, entry: FileEntry, source: Source, on_bytes: Callable[[int], None]) -> dict[str, Any]:
        """Stream one file into staging, hashing in the same pass; refuse it unless it matches.

        A file left in an adopted staging directory is re-hashed and continued from where
        the killed run stopped (the hub client no longer resumes across processes). A
        complete one is not reopened: it may be a hard link another version shares (#23)."""
        target = staging / entry.path
        if target.parent != staging:
            target.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        if target.exists():
            size = _hash_into(target, digest)
            if size > entry.size:
                target.unlink()
                digest, size = hashlib.sha256(), 0
            else:
                on_bytes(size)
        if size < entry.size or not target.exists():
            if target.exists():
                os.chmod(target, FILE_MODE)
            self._append(target, entry, source.read(entry.path, size) if size < entry.size else iter(()), source, digest, size, on_bytes)
            size = os.stat(target).st_size
        actual = digest.hexdigest()
        if size != entry.size or actual != entry.sha256:
            target.unlink()  # wrong bytes are never resumed from
            if size != entry.size:
                raise IntegrityError(f"{source.describe()}/{entry.path}: size {size}, expected {entry.size}", file=entry.path, expected=str(entry.size), actual=str(size))
            raise IntegrityError(f"{source.describe()}/{entry.path}: sha256 {actual}, expected {entry.sha256}", file=entry.path, expected=entry.sha256, actual=actual)
        set_mode(target, PUBLISHED_MODE)  # published bytes are never rewritten in place (they get mmapped)
        return file_record(target, entry.path, size, actual)

    @staticmethod
    def _append(target: Path, entry: FileEntry, chunks: Iterator[bytes], source: Source, digest: Any, size: int,
                on_bytes: Callable[[int], None]) -> None:  # fmt: skip
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
        try:
            for chunk in chunks:
                size += len(chunk)
                if size > entry.size:
                    raise IntegrityError(
                        f"{source.describe()}/{entry.path}: larger than the declared {entry.size} bytes",
                        file=entry.path, expected=str(entry.size), actual=f">{entry.size}",
                    )
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                on_bytes(len(chunk))
            os.fsync(fd)
        finally:
            os.close(fd)

    def seal(self, staging: Path, want: Want, files: list[dict[str, Any]]) -> None:
        """Write the manifest and fsync every directory of the staged version."""
        manifest = {
            "kind": want.kind, "id": want.id, "version": want.version,
            "source": want.source.model_dump(mode="json"),
            "files": sorted(files, key=lambda f: f["path"]), "published_at": (sealed := now()), "verified_at": sealed,
        }  # fmt: skip
        manifest.update(digest=manifest_digest(manifest), metadata=dict(want.metadata))  # issue #35
        write_manifest(staging, manifest)
        for directory in sorted({staging / f["path"] for f in files} | {staging}, key=lambda p: -len(p.parts)):
            if directory.is_dir():
                fsync_dir(directory)
            elif directory.parent != staging:
                fsync_dir(directory.parent)

    def record_metadata(self, want: Want) -> bool:
        """Bring a published version's recorded metadata and digest up to what the index declares
        (issue #35): a description or provenance corrected without new bytes needs no new version.
        The files are not touched; True when the manifest was rewritten."""
        vdir = self.version_dir(want.kind, want.id, want.version)
        manifest = read_manifest(vdir)
        if manifest is None:
            return False
        wanted = {"digest": manifest_digest(manifest), "metadata": dict(want.metadata)}
        if all(manifest.get(key) == value for key, value in wanted.items()):
            return False
        write_manifest(vdir, {**manifest, **wanted})
        return True

    def publish(self, staging: Path, kind: Kind, aid: str, version: str) -> None:
        final = self.version_dir(kind, aid, version)
        try:
            os.rename(staging, final)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise StoreError(f"{final}: already exists; another writer published it") from None
            raise
        fsync_dir(final.parent)

    def swap_link(self, kind: Kind, aid: str, name: str, version: str | None) -> None:
        """Point ``name`` (current/previous) at a version, atomically; None removes the link."""
        link = self.artifact_dir(kind, aid) / name
        if version is None:
            link.unlink(missing_ok=True)
        else:
            tmp = temp_name(link)
            os.symlink(f"versions/{version}", tmp)
            try:
                os.replace(tmp, link)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        fsync_dir(link.parent)

    def read_link(self, kind: Kind, aid: str, name: str) -> str | None:
        try:
            target = os.readlink(self.artifact_dir(kind, aid) / name)
        except (FileNotFoundError, OSError):
            return None
        return target.removeprefix("versions/") if target.startswith("versions/") and "/" not in target[9:] else None

    # -- removing ------------------------------------------------------------------
    def remove(self, kind: Kind, aid: str, name: str) -> int:
        """Delete a version or leftover; returns bytes freed. Readers never see it half gone
        because it is renamed to a staging name first."""
        base = self.artifact_dir(kind, aid)
        path = base / "versions" / name
        if not path.exists() and (base / name).is_symlink():
            (base / name).unlink()  # a temp link left by a killed swap
            return 0
        if not path.exists():
            return 0
        if STAGING_MARK not in name:
            doomed = path.with_name(f"{name}{STAGING_MARK}rm.{secrets.token_hex(4)}")
            os.rename(path, doomed)
            fsync_dir(path.parent)
            path = doomed
        return self._remove_tree(path)

    def remove_artifact_if_empty(self, kind: Kind, aid: str) -> None:
        base = self.artifact_dir(kind, aid)
        versions = base / "versions"
        if versions.is_dir() and not any(versions.iterdir()):
            for name in ("current", "previous"):
                (base / name).unlink(missing_ok=True)
            versions.rmdir()
            base.rmdir()
            fsync_dir(base.parent)

    def quarantine(self, kind: Kind, aid: str, version: str) -> Path:
        """Move a damaged version aside for inspection; its links now dangle until re-fetched."""
        src = self.version_dir(kind, aid, version)
        dest_dir = self.root / "quarantine" / kind / aid
        makedirs_durable(dest_dir, DIR_MODE)
        dest = dest_dir / f"{version}.{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.{secrets.token_hex(2)}"
        os.rename(src, dest)  # same filesystem: quarantine lives under the root
        fsync_dir(src.parent)
        fsync_dir(dest_dir)
        return dest

    def abandon(self, staging: Path) -> None:
        if staging.exists():
            self._remove_tree(staging)

    def _remove_tree(self, path: Path) -> int:
        """rm -r of a version or staging directory no reader resolves; returns the bytes freed
        (a file another version still links frees nothing). Unlinking a hard link moves the
        ctime of every version sharing the inode, so their manifests are refreshed (#23)."""
        touched, freed = shared_inodes(path)
        _rmtree(path)
        fsync_dir(path.parent)
        self.refresh_shared(touched)
        return freed

    def published_versions(self) -> Iterator[Path]:
        """Every published version directory (not staging, not quarantine)."""
        for kind in ("models", "loras"):
            for artifact in _subdirs(self.root / kind):
                for vdir in _subdirs(artifact / "versions"):
                    if STAGING_MARK not in vdir.name:
                        yield vdir

    def sweep_versions(self) -> None:
        """Remove the manifest temp files of a writer killed while it refreshed a published
        version's manifest (``refresh_shared``, ``reverify``): no orphan survives a run."""
        for vdir in self.published_versions():
            sweep_temps(vdir)

    def refresh_shared(self, touched: Mapping[int, int]) -> None:
        """Bring manifests up to date after we added or removed a hard link (issue #23).

        The link count lives in the inode, so a link or unlink moves the ctime every sharing
        version recorded. ``touched`` maps each inode to its ctime just before our own
        operation: a record that matched it then, and now differs in ctime alone, is
        updated; anything else changed stays drifted, to be re-hashed."""
        if not touched:
            return
        for vdir in self.published_versions():
            if not _inodes_of(vdir).intersection(touched):
                continue  # most versions share nothing with these inodes: their manifests stay unread
            manifest = read_manifest(vdir)
            if manifest is None:
                continue
            changed = False
            for f in manifest["files"]:
                if f.get("ino") not in touched or f.get("ctime_ns") != touched[f["ino"]]:
                    continue
                try:
                    ctime = os.stat(vdir / f["path"]).st_ctime_ns
                except OSError:
                    continue
                if ctime != f["ctime_ns"] and drift(vdir / f["path"], {**f, "ctime_ns": ctime}) is None:
                    f["ctime_ns"], changed = ctime, True
            if changed:
                write_manifest(vdir, manifest)


_INODES: dict[Path, tuple[int, int, frozenset[int]]] = {}  # version dir -> (manifest mtime_ns, size, its inodes)


def _inodes_of(version_dir: Path) -> frozenset[int]:
    """The inodes a version's manifest records, parsed again only when the manifest changed:
    each reuse step asks this of every version, and a zoo may hold thousands."""
    try:
        st = os.stat(version_dir / MANIFEST)
    except OSError:
        return frozenset()
    cached = _INODES.get(version_dir)
    if cached is not None and cached[:2] == (st.st_mtime_ns, st.st_size):
        return cached[2]
    manifest = read_manifest(version_dir)
    inodes = frozenset(f["ino"] for f in (manifest or {}).get("files", []) if isinstance(f.get("ino"), int))
    _INODES[version_dir] = (st.st_mtime_ns, st.st_size, inodes)
    return inodes


def _hash_into(source: Path | int, digest: Any) -> int:
    """Feed a file (a path, or an open descriptor that stays open) to ``digest``; its size."""
    size, buf = 0, bytearray(1 << 20)
    view = memoryview(buf)
    with open(source, "rb", buffering=0, closefd=not isinstance(source, int)) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return size


def read_manifest(version_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((version_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return cast(dict[str, Any], data) if isinstance(data, dict) and isinstance(data.get("files"), list) else None


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The whole-version digest of what a manifest pins (index/digest.py): the same for the same bytes on every host."""
    source = manifest.get("source")
    ollama = source.get("digest") if isinstance(source, dict) and source.get("type") == "ollama" else None
    return version_digest(((str(f["path"]), str(f["sha256"])) for f in manifest["files"]), ollama if isinstance(ollama, str) else None)


def declared_facts(version_dir: Path) -> dict[str, Any]:
    """What a version declares about itself, for model-info.json (issue #35): the index's
    description, tags and provenance as apply recorded them, the whole-version digest, and the
    quantization its config.json declares (null: none). Empty values when a part is unreadable."""
    manifest = read_manifest(version_dir) or {"files": []}
    metadata = manifest.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    try:
        digest = manifest.get("digest") or manifest_digest(manifest)
    except (KeyError, TypeError):
        digest = ""
    try:
        with open(version_dir / "config.json", "rb") as f:
            config = jsonbound.loads(f.read(CONFIG_LIMIT + 1), limit=CONFIG_LIMIT)  # the hub's bytes: bounded
    except (OSError, ValueError):
        config = {}
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return {"digest": digest, "description": metadata.get("description", ""),
            "tags": metadata.get("tags", []), "provenance": metadata.get("provenance", {}),
            "quantization": quantization if isinstance(quantization, dict) else None}  # fmt: skip


def write_manifest(version_dir: Path, manifest: dict[str, Any]) -> None:
    """manifest.json, read-only like the files it describes."""
    write_atomic(version_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), mode=PUBLISHED_MODE)


def file_record(path: Path, rel: str, size: int, sha256: str) -> dict[str, Any]:
    """A manifest's entry: the pin, plus what a stat-only no-op compares (mtime, ctime, inode, owner)."""
    st = os.stat(path)
    return {"path": rel, "size": size, "sha256": sha256, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "ino": st.st_ino, "uid": st.st_uid}  # fmt: skip


def drift(path: str | Path, record: dict[str, Any]) -> str | None:
    """Why a published file can no longer be trusted without re-hashing it, or None."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    if (st.st_size, st.st_mtime_ns, st.st_ino) != (record["size"], record.get("mtime_ns"), record.get("ino")):
        return "rewritten"
    if st.st_uid != record.get("uid", st.st_uid):
        return f"owner {st.st_uid}, was {record['uid']}"
    if st.st_mode & 0o777 != PUBLISHED_MODE:
        return f"mode {st.st_mode & 0o777:o}"
    # A user can put mtime back (touch -d, os.utime) after a same-size rewrite, never ctime.
    # Manifests written before ctime was recorded lack it; their next re-verify adds it.
    if "ctime_ns" in record and st.st_ctime_ns != record["ctime_ns"]:
        return "changed (ctime)"
    return None



_ALIAS_NAME = re.compile(ID_PATTERN)


def _alias_target(path: Path) -> str | None:
    """The sibling model id a link names ("qwen", never "../x" or "/x"), or None: not such a link."""
    try:
        target = os.readlink(path)
    except OSError:
        return None
    return target if _ALIAS_NAME.match(target) and target not in (".", "..") else None


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def set_mode(path: Path, mode: int) -> None:
    """chmod only when the mode differs: a chmod moves the ctime, which every version sharing
    the inode (a hard link, issue #23) would then see as drift."""
    if os.stat(path).st_mode & 0o7777 != mode:
        os.chmod(path, mode)


def shared_inodes(path: Path) -> tuple[dict[int, int], int]:
    """({inode: ctime} of the files below ``path`` that other links share, bytes only it holds)."""
    shared, own = {}, 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_nlink > 1:
                shared[st.st_ino] = st.st_ctime_ns
            else:
                own += st.st_size
    return shared, own


def _tree_size(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _rmtree(path: Path) -> None:
    shutil.rmtree(path)  # files are 0444 but their directories 0755, so unlinking works


def filesystem_type(path: Path) -> str:
    """The mount type under ``path``, from /proc/self/mountinfo ('' if unknown)."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                mount = fields[4].replace("\\040", " ")
                sep = fields.index("-")
                if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                    best, fstype = mount, fields[sep + 1]
    except OSError:
        return ""
    return fstype
