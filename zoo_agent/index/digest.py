"""The one canonical digest of pinned files (issues #22, #35).

sha256 over canonical JSON (sorted keys, no spaces, ASCII) of sorted ``[path, sha256]``
pairs: what a peer reports for a tenant (``resident/peers.py``) and what ``manifest.json``
records for a whole version. Only pinned facts go in, never paths on disk or settings, so
the same bytes give the same digest on every host.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from zoo_agent.index.model import ArtifactEntry

__all__ = ["artifact_doc", "digest_of", "pinned_files", "version_digest"]


def pinned_files(files: Iterable[tuple[str, str]]) -> list[list[str]]:
    """``[path, sha256]`` pairs, sorted: the canonical file list."""
    return sorted([path, sha256] for path, sha256 in files)


def digest_of(document: Any) -> str:
    """``sha256:<hex>`` of the canonical JSON of ``document``."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def artifact_doc(aid: str, entry: ArtifactEntry) -> dict[str, Any]:
    """An artifact as a peer's tenant digest counts it: id, version, files (an Ollama digest for an 'ollama' source)."""
    doc: dict[str, Any] = {"id": aid, "version": entry.version, "files": pinned_files((f.path, f.sha256) for f in entry.files)}
    if entry.source.type == "ollama":  # no files: the daemon's manifest digest pins the bytes
        doc["ollama"] = entry.source.digest
    return doc


def version_digest(files: Iterable[tuple[str, str]], ollama: str | None = None) -> str:
    """The whole-version digest manifest.json records: the files alone (an 'ollama' source: its
    manifest digest), so one set of bytes has one digest whatever its id or version label."""
    doc: dict[str, Any] = {"files": pinned_files(files)}
    if ollama is not None:
        doc["ollama"] = ollama
    return digest_of(doc)
