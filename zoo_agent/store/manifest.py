"""What a published version records about its files (``manifest.json``), and the checks against it (issue #3).

A manifest pins each file (path, size, sha256) and records what a stat-only no-op compares (mtime,
ctime, inode, owner): ``drift`` says why a file can no longer be trusted without re-hashing it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, cast

from zoo_agent import jsonbound
from zoo_agent.index.digest import version_digest
from zoo_agent.store.durable import PUBLISHED_MODE, write_atomic

__all__ = ["CONFIG_LIMIT", "MANIFEST", "declared_facts", "drift", "file_record", "hash_file", "hash_into", "manifest_digest", "read_manifest",
           "set_mode", "write_manifest"]  # fmt: skip

MANIFEST = "manifest.json"
CONFIG_LIMIT = 1 << 20  # a model's config.json is a few kB; declared_facts reads no more


def hash_file(path: Path | int) -> tuple[str, int]:
    """(sha256, size) of a file (or an open descriptor, read to its end and left open),
    streamed; hashlib releases the GIL, so threads scale."""
    digest = hashlib.sha256()
    size = hash_into(path, digest)
    return digest.hexdigest(), size


def hash_into(source: Path | int, digest: Any) -> int:
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


def set_mode(path: Path, mode: int) -> None:
    """chmod only when the mode differs: a chmod moves the ctime, which every version sharing
    the inode (a hard link, issue #23) would then see as drift."""
    if os.stat(path).st_mode & 0o7777 != mode:
        os.chmod(path, mode)
