"""The zoo on disk: stage, verify, publish, swap, remove, lock (issue #3).

The layout is ``layout.py``'s; a version is written by ``staging.py``, its manifest read and written by
``manifest.py``, alias links kept by ``aliases.py``. ``Zoo`` is all of them, with what readers resolve,
the lock, ``current`` and ``previous`` swapped, and versions removed and quarantined.

Readers resolve ``current`` and so only ever see complete, verified versions: a version
directory appears by ``rename`` after every byte, file and directory was fsynced, and
``current`` moves by renaming a temporary symlink over it (hf's refs do the same).
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from zoo_agent.errors import IntegrityError, LockHeld, StoreError, UsageError
from zoo_agent.formats import now
from zoo_agent.plan import Kind
from zoo_agent.store.aliases import Aliases
from zoo_agent.store.durable import DIR_MODE, FILE_MODE, flock_within, fsync_dir, makedirs_durable, sweep_temps, temp_name
from zoo_agent.store.layout import STAGING_MARK
from zoo_agent.store.manifest import (
    CONFIG_LIMIT,
    MANIFEST,
    declared_facts,
    drift,
    file_record,
    hash_file,
    manifest_digest,
    read_manifest,
    set_mode,
    write_manifest,
)
from zoo_agent.store.staging import Staging

__all__ = [
    "CONFIG_LIMIT", "MANIFEST", "NETWORK_FILESYSTEMS", "STAGING_MARK", "Zoo", "declared_facts", "drift", "file_record", "hash_file",
    "manifest_digest", "now", "read_manifest", "set_mode", "shared_inodes", "write_manifest",
]  # fmt: skip

NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "ceph", "glusterfs", "fuse.sshfs", "afs"})


@dataclass(frozen=True)
class Zoo(Aliases, Staging):
    """The zoo under ``root``: its layout (``layout.py``), versions written (``staging.py``), alias links
    (``aliases.py``); here what readers resolve, the lock, ``current`` swapped, and versions removed."""

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
            if not flock_within(fd, wait):
                raise LockHeld(f"{self.root}: another zoo-agent run holds the lock; retry, or pass --wait SECONDS")
            yield  # the lock file is never written: a refused run leaves the tree byte-identical
        finally:
            os.close(fd)

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







def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []



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
