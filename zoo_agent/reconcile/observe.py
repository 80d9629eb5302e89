"""Scan the zoo into an ``Observed`` value. Reads manifests and stats files; never
reads file content, so a no-op ``apply`` costs almost nothing (issue #3)."""

from __future__ import annotations

import os
from pathlib import Path

from zoo_agent.jsonbound import loads
from zoo_agent.plan import Have, Kind, Observed, Seen
from zoo_agent.store.zoo import STAGING_MARK, Zoo, drift, read_manifest

__all__ = ["observe"]

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
    return Have(version, frozenset(pins), tuple(drifted), published, size, verified, frozenset(drifted_paths))


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
    return Observed(seen, _in_use(zoo))
