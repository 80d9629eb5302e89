"""Backups of what cannot be fetched again, and restores that check every byte first (issue #10).

A backup directory holds `files/<path in the zoo>` and `backup-manifest.json` (every
file's path, size, sha256, mode; the `current`/`previous` links; the time, the host and
the digest of the index that was applied). It is incremental: a file whose size and
mtime match the previous backup's entry is not read or written again. The manifest is
written last, so a backup without one is incomplete and is never restored from.

Model files are included only on request: they can be fetched again, their manifests
(which are backed up) say exactly what to fetch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .durable import fsync_dir, makedirs_durable, temp_name, write_atomic
from .errors import IntegrityError, UsageError
from .store import DIR_MODE, MANIFEST, Zoo, now

__all__ = ["BACKUP_MANIFEST", "Summary", "backup", "check_backup", "restore"]

BACKUP_MANIFEST = "backup-manifest.json"
FORMAT = 1
CHUNK = 1 << 20


@dataclass(frozen=True)
class Summary:
    files: int
    bytes: int
    bytes_written: int
    skipped: tuple[str, ...] = ()  # restore: what was left for apply to fetch

    def as_dict(self) -> dict[str, Any]:
        return {"files": self.files, "bytes": self.bytes, "bytes_written": self.bytes_written, "skipped": list(self.skipped)}


def _is_temp(name: str) -> bool:
    return name.startswith(".") or ".tmp." in name


def _collect(zoo: Zoo, include_models: bool) -> tuple[list[str], list[tuple[str, str]], list[tuple[str, int]]]:
    """(files, links, directories with their modes) relative to the root: host/, resident/,
    every published manifest, and with ``include_models`` the files they describe."""
    files: list[str] = []
    links: list[tuple[str, str]] = []
    dirs: list[tuple[str, int]] = []
    for top in ("host", "resident"):
        if (zoo.root / top).is_dir():
            dirs.append((top, (zoo.root / top).stat().st_mode & 0o7777))
        for path in sorted((zoo.root / top).rglob("*")):
            rel = str(path.relative_to(zoo.root))
            if _is_temp(path.name):
                continue
            if path.is_symlink():
                links.append((rel, os.readlink(path)))
            elif path.is_dir():
                dirs.append((rel, path.stat().st_mode & 0o7777))
            elif path.is_file():
                files.append(rel)
    for kind in ("models", "loras"):
        for artifact in sorted(p for p in (zoo.root / kind).glob("*") if p.is_dir()):
            for name in ("current", "previous"):
                if (artifact / name).is_symlink():
                    links.append((str((artifact / name).relative_to(zoo.root)), os.readlink(artifact / name)))
            for version in sorted(p for p in (artifact / "versions").glob("*") if p.is_dir() and not _is_temp(p.name)):
                if not (version / MANIFEST).is_file():
                    continue
                chosen = sorted(p for p in version.rglob("*") if p.is_file()) if include_models else [version / MANIFEST]
                files += [str(p.relative_to(zoo.root)) for p in chosen]
    return files, links, dirs


def _copy_hashed(src: Path, dst: Path, mode: int) -> str:
    """Stream ``src`` to ``dst`` (temp name, fsync, rename), hashing as it goes."""
    makedirs_durable(dst.parent, DIR_MODE)
    tmp = temp_name(dst)
    digest = hashlib.sha256()
    try:
        with open(src, "rb") as fin, open(tmp, "xb") as fout:
            while chunk := fin.read(CHUNK):
                digest.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / BACKUP_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("files"), list) else None


def backup(zoo: Zoo, dest: Path, *, host: str, include_models: bool = False) -> Summary:
    """Copy what changed since the last backup into ``dest``; the manifest goes last."""
    if dest.resolve().is_relative_to(zoo.root.resolve()):
        raise UsageError(f"--to {dest}: inside the zoo it backs up; choose another place")
    makedirs_durable(dest, DIR_MODE)
    before = {e["path"]: e for e in (_read_manifest(dest) or {}).get("files", [])}
    files, links, dirs = _collect(zoo, include_models)
    entries, written, total = [], 0, 0
    for rel in files:
        st = (zoo.root / rel).stat()
        old = before.get(rel)
        target = dest / "files" / rel
        if old and (old["size"], old["mtime_ns"], old["mode"]) == (st.st_size, st.st_mtime_ns, st.st_mode & 0o7777) and target.is_file():
            entries.append(old)  # unchanged since the last backup: neither read nor written
        else:
            digest = _copy_hashed(zoo.root / rel, target, st.st_mode & 0o7777)
            entries.append({"path": rel, "size": st.st_size, "sha256": digest, "mode": st.st_mode & 0o7777, "mtime_ns": st.st_mtime_ns})
            written += st.st_size
        total += st.st_size
    applied = zoo.root / "host" / "applied-index.json"
    manifest = {
        "format": FORMAT, "created": now(), "host": host, "root": str(zoo.root), "include_models": include_models,
        "index_sha256": hashlib.sha256(applied.read_bytes()).hexdigest() if applied.is_file() else None,
        "files": entries, "links": [{"path": p, "target": t} for p, t in links],
        "dirs": [{"path": p, "mode": m} for p, m in dirs],
    }  # fmt: skip
    for directory in {(dest / "files" / rel).parent for rel in files}:
        fsync_dir(directory)
    write_atomic(dest / BACKUP_MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode(), 0o640)
    fsync_dir(dest)
    kept = set(files)
    for stale in [p for p in (dest / "files").rglob("*") if p.is_file() and str(p.relative_to(dest / "files")) not in kept]:
        stale.unlink()  # gone from the zoo since the last backup
    summary = Summary(len(entries), total, written)
    # The last backup's summary stays in the zoo (not in host/: it would change what it describes).
    write_atomic(zoo.root / BACKUP_MANIFEST, (json.dumps({"created": manifest["created"], "to": str(dest), **summary.as_dict(),
                                                         "include_models": include_models}, indent=2) + "\n").encode(), 0o640)  # fmt: skip
    return summary


def check_backup(source: Path) -> dict[str, Any]:
    """The backup's manifest, once every file in it matches; else IntegrityError naming the files."""
    manifest = _read_manifest(source)
    if manifest is None:
        raise UsageError(f"--from {source}: no {BACKUP_MANIFEST} (not a backup, or one that did not finish)")
    damaged = []
    for entry in manifest["files"]:
        path = source / "files" / entry["path"]
        try:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
            if digest.hexdigest() != entry["sha256"]:
                damaged.append(f"{entry['path']} (sha256 {digest.hexdigest()[:12]}…, expected {entry['sha256'][:12]}…)")
        except OSError as exc:
            damaged.append(f"{entry['path']} ({exc.strerror or exc})")
    if damaged:
        more = f" and {len(damaged) - 3} more" if len(damaged) > 3 else ""
        raise IntegrityError(f"{source}: {len(damaged)} damaged file(s), nothing restored: {'; '.join(damaged[:3])}{more}")
    return manifest


def _put(source: Path, dst: Path, entry: dict[str, Any]) -> None:
    """One file back from the backup, checked again as it is copied (it was checked before, too)."""
    if _copy_hashed(source / "files" / entry["path"], dst, entry["mode"]) != entry["sha256"]:
        dst.unlink(missing_ok=True)
        raise IntegrityError(f"{source / 'files' / entry['path']}: changed while it was being restored")


def restore(zoo: Zoo, source: Path, manifest: dict[str, Any]) -> Summary:
    """Put each file of a checked backup (``check_backup``) back by rename; whole versions land by one rename."""
    by_path = {e["path"]: e for e in manifest["files"]}
    versions: dict[str, list[dict[str, Any]]] = {}
    written = 0
    skipped = []
    for directory in manifest.get("dirs", []):  # host/ and resident/ keep their modes (0750 by default)
        (zoo.root / directory["path"]).mkdir(parents=True, exist_ok=True)
        os.chmod(zoo.root / directory["path"], directory["mode"])
    for rel, entry in by_path.items():
        parts = rel.split("/")
        if parts[0] in ("models", "loras") and len(parts) >= 5 and parts[2] == "versions":
            versions.setdefault("/".join(parts[:4]), []).append(entry)
            continue
        _put(source, zoo.root / rel, entry)
        written += entry["size"]
    for version_rel, entries in sorted(versions.items()):
        final = zoo.root / version_rel
        manifest_files = json.loads((source / "files" / version_rel / MANIFEST).read_text()).get("files", [])
        complete = all(f"{version_rel}/{f['path']}" in by_path for f in manifest_files)
        if final.exists() or not complete:
            if not final.exists():
                skipped.append(version_rel)  # apply fetches it, from its source, as the index says
            continue
        staging = final.with_name(f"{final.name}.tmp.restore.{os.getpid()}")
        for entry in entries:
            _put(source, staging / Path(entry["path"]).relative_to(version_rel), entry)
            written += entry["size"]
        for directory in sorted({p for p in staging.rglob("*") if p.is_dir()} | {staging}, key=lambda p: -len(p.parts)):
            fsync_dir(directory)
        os.replace(staging, final)
        fsync_dir(final.parent)
    for link in manifest["links"]:
        path = zoo.root / link["path"]
        if (path.parent / link["target"]).exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_name(path)
            os.symlink(link["target"], tmp)
            os.replace(tmp, path)
            fsync_dir(path.parent)
    return Summary(len(by_path), sum(e["size"] for e in by_path.values()), written, tuple(skipped))
