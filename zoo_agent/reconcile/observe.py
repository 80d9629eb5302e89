"""Scan the zoo into an ``Observed`` value. Reads manifests and stats files; never
reads file content, so a no-op ``apply`` costs almost nothing (issue #3).

An Ollama model's bytes are the daemon's, not ours: for those versions the daemon is asked
once (``/api/tags``) whether it still holds the pinned digest, and one it lost is drifted
like a changed file, so ``status`` shows it and ``apply`` pulls it again (issue #35).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from zoo_agent.errors import SourceError
from zoo_agent.jsonbound import loads
from zoo_agent.plan import Have, Kind, Observed, Seen
from zoo_agent.store.zoo import STAGING_MARK, Zoo, drift, read_manifest

__all__ = ["observe"]

log = logging.getLogger(__name__)

KINDS: tuple[Kind, ...] = ("models", "loras")


def _have(version_dir: Path, version: str) -> Have:
    manifest = read_manifest(version_dir)
    if manifest is None:
        return Have(version, None)
    pins, drifted, drifted_paths, size = set(), [], set(), 0
    base = str(version_dir)
    for f in manifest["files"]:
        pins.add((f["path"], f["sha256"], f["size"]))
        size += f["size"]
        if why := drift(os.path.join(base, f["path"]), f):  # str paths: this loop runs per file
            drifted.append(f"{f['path']} ({why})")
            drifted_paths.add(f["path"])
    verified = str(manifest.get("verified_at", ""))
    published = str(manifest.get("published_at", verified))  # manifests before #18 knew only verified_at
    return Have(version, frozenset(pins), tuple(drifted), published, size, verified, frozenset(drifted_paths), _daemon(manifest))


def _daemon(manifest: dict[str, object]) -> tuple[str, str] | None:
    source = manifest.get("source")
    if isinstance(source, dict) and source.get("type") == "ollama" and isinstance(source.get("name"), str) and isinstance(source.get("digest"), str):
        return str(source["name"]), str(source["digest"])
    return None


def _ask_daemon(seen: dict[tuple[Kind, str], Seen]) -> dict[tuple[Kind, str], Seen]:
    """The Ollama versions the daemon no longer holds, drifted; the rest as they were. A daemon
    that does not answer leaves them as they were: unknown is not drift (the resident says why)."""
    pins = {have.daemon for s in seen.values() for have in s.versions.values() if have.daemon is not None}
    if not pins:
        return seen
    from zoo_agent.sources.ollama import daemon_has  # imports the ollama client: only when the zoo holds such a model

    try:
        held = daemon_has(dict(pins))
    except SourceError as exc:
        log.warning("cannot check the Ollama models against the daemon: %s", exc)
        return seen
    out = dict(seen)
    for key, s in seen.items():
        lost = {v: h for v, h in s.versions.items() if h.daemon is not None and not held.get(h.daemon[0], False)}
        if lost:
            versions = dict(s.versions)
            for v, h in lost.items():
                assert h.daemon is not None
                versions[v] = dataclasses.replace(h, drifted=(*h.drifted, f"ollama:{h.daemon[0]} (the daemon no longer has {h.daemon[1][:19]}…)"))
            out[key] = dataclasses.replace(s, versions=versions)
    return out


def _seen(zoo: Zoo, kind: Kind, aid: str) -> Seen:
    base = zoo.artifact_dir(kind, aid)
    versions, leftovers = {}, []
    try:
        entries = sorted(os.scandir(base / "versions"), key=lambda e: e.name)
    except FileNotFoundError:
        entries = []
    for entry in entries:
        if STAGING_MARK in entry.name:
            leftovers.append(entry.name)
        elif entry.is_dir(follow_symlinks=False):
            versions[entry.name] = _have(Path(entry.path), entry.name)
    try:  # temp links of a killed swap: .current.<pid>.<rand>.tmp
        leftovers += sorted(e.name for e in os.scandir(base) if e.name.endswith(".tmp") and e.is_symlink())
    except FileNotFoundError:
        pass
    return Seen(kind, aid, versions, zoo.read_link(kind, aid, "current"), zoo.read_link(kind, aid, "previous"), tuple(leftovers))


def _in_use(zoo: Zoo) -> frozenset[tuple[Kind, str, str]]:
    """What a running resident has loaded, from the model-info.json files it writes
    (``resident/reports.py``): each tenant's model, its adapters, its selection's embedding model."""
    used: set[tuple[Kind, str, str]] = set()
    for info_path in (zoo.resident_dir / "tenants").glob("*/model-info.json"):
        try:
            info = loads(info_path.read_bytes(), limit=1 << 20)
            used.add(("models", str(info["model"]), str(info["version"])))
            for lid, version in dict(info.get("adapters", {})).items():
                used.add(("loras", str(lid), str(version)))
            if isinstance(label := info.get("embedding_model"), str) and "@" in label:
                mid, _, version = label.partition("@")
                used.add(("models", mid, version))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return frozenset(used)


def observe(zoo: Zoo) -> Observed:
    seen: dict[tuple[Kind, str], Seen] = {}
    for kind in KINDS:
        try:
            ids = sorted(e.name for e in os.scandir(zoo.root / kind) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            continue
        for aid in ids:
            seen[(kind, aid)] = _seen(zoo, kind, aid)
    return Observed(_ask_daemon(seen), _in_use(zoo))
