"""Writing a version (issue #3): a staging directory of our own, each file streamed in and hashed in the same
pass, refused unless it matches its pin, sealed with its manifest, then renamed into ``versions/``.

A version directory appears by ``rename`` after every byte, file and directory was fsynced: readers never
see a partial one. A killed run's staging directory is adopted and its files continued from where it stopped.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from zoo_agent.errors import IntegrityError, StoreError
from zoo_agent.formats import human_bytes, now
from zoo_agent.index.model import FileEntry
from zoo_agent.plan import Kind, Want
from zoo_agent.sources import Source
from zoo_agent.store.durable import DIR_MODE, FILE_MODE, PUBLISHED_MODE, fsync_dir, makedirs_durable
from zoo_agent.store.layout import STAGING_MARK, Layout
from zoo_agent.store.manifest import file_record, hash_into, manifest_digest, read_manifest, set_mode, write_manifest

__all__ = ["Staging"]


class Staging(Layout):
    """A version staged, sealed and published."""

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
            size = hash_into(target, digest)
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



def _tree_size(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
