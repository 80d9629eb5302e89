"""Deep verification: re-hash published versions against their manifests (issue #3).

Files are hashed in parallel threads (hashlib releases the GIL on large buffers), largest
first so the cores finish together.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from zoo_agent.errors import UsageError
from zoo_agent.index.model import FileEntry, Source
from zoo_agent.plan import Desired, Kind, Observed, Want
from zoo_agent.store.zoo import Zoo, hash_file, read_manifest

__all__ = ["Finding", "Report", "resolve", "select", "verify", "wants_to_rebuild"]

log = logging.getLogger("zoo_agent")


@dataclass(frozen=True)
class Finding:
    kind: Kind
    id: str
    version: str
    path: str
    expected: str
    actual: str  # a digest, or "missing", or "unreadable: <reason>"

    def line(self, zoo: Zoo) -> str:
        if self.path.startswith("ollama:"):  # the daemon holds the bytes (issue #35)
            return f"{zoo.version_dir(self.kind, self.id, self.version)}: the Ollama daemon no longer has {self.path[7:]} {self.expected}"
        where = zoo.version_dir(self.kind, self.id, self.version) / self.path
        return f"{where}: expected sha256 {self.expected}, got {self.actual}"


@dataclass(frozen=True)
class Report:
    versions: tuple[tuple[Kind, str, str], ...]
    files: int
    bytes: int
    findings: tuple[Finding, ...]

    def bad_versions(self) -> list[tuple[Kind, str, str]]:
        return sorted({(f.kind, f.id, f.version) for f in self.findings})


def resolve(observed: Observed, ref: str) -> tuple[Kind, str]:
    """An artifact named as ``ID``, ``models/ID`` or ``loras/ID``."""
    kind_hint, _, aid = ref.rpartition("/")
    matches = sorted(key for key in observed.seen if key[1] == aid and kind_hint in ("", key[0]))
    if not matches:
        known = ", ".join(f"{k}/{i}" for k, i in sorted(observed.seen)) or "none"
        raise UsageError(f"'{ref}' is not in the zoo (artifacts: {known})")
    if len(matches) > 1:
        raise UsageError(f"'{ref}' is both a model and a lora; say models/{aid} or loras/{aid}")
    return matches[0]


def select(observed: Observed, refs: tuple[str, ...]) -> list[tuple[Kind, str, str]]:
    """Every published version of the named artifacts (all of them when none is named)."""
    keys = [resolve(observed, ref) for ref in refs] or sorted(observed.seen)
    return [(k, i, v) for (k, i) in dict.fromkeys(keys) for v in sorted(observed.seen[(k, i)].versions)]


def verify(zoo: Zoo, versions: list[tuple[Kind, str, str]], jobs: int | None = None, observed: Observed | None = None) -> Report:
    """Re-hash every file of ``versions``; with ``observed``, an Ollama version its daemon no
    longer holds (``observe`` asked it) is a finding too."""
    work: list[tuple[Kind, str, str, str, str, int]] = []
    findings: list[Finding] = []
    for kind, aid, version in versions:
        have = observed.seen[(kind, aid)].versions.get(version) if observed and (kind, aid) in observed.seen else None
        if have is not None and have.daemon is not None and have.drifted:  # no files of ours: its drift is the daemon's
            findings.append(Finding(kind, aid, version, f"ollama:{have.daemon[0]}", have.daemon[1], "missing from the daemon"))
    for kind, aid, version in versions:
        manifest = read_manifest(zoo.version_dir(kind, aid, version))
        if manifest is None:
            findings.append(Finding(kind, aid, version, "manifest.json", "a readable manifest", "missing"))
            continue
        work += [(kind, aid, version, f["path"], f["sha256"], f["size"]) for f in manifest["files"]]
    work.sort(key=lambda w: -w[5])

    def check(item: tuple[Kind, str, str, str, str, int]) -> Finding | None:
        kind, aid, version, path, sha256, _size = item
        try:
            actual, _ = hash_file(zoo.version_dir(kind, aid, version) / path)
        except FileNotFoundError:
            actual = "missing"
        except OSError as exc:
            actual = f"unreadable: {exc.strerror}"
        return None if actual == sha256 else Finding(kind, aid, version, path, sha256, actual)

    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
        findings += [f for f in pool.map(check, work) if f is not None]
    return Report(tuple(versions), len(work), sum(w[5] for w in work), tuple(findings))


def wants_to_rebuild(desired: Desired, quarantined: dict[tuple[Kind, str, str], Path]) -> tuple[Want, ...]:
    """Quarantined versions the index no longer declares but the host keeps (a previous
    version for rollback), as their own manifests pinned them: ``verify --repair`` puts them
    back too, mostly from the files just re-fetched (a hard link made both bad, issue #23)."""
    declared = {(w.kind, w.id) for w in desired.wants}
    current = {(w.kind, w.id, w.version) for w in desired.wants}
    wants = []
    for (kind, aid, version), moved in sorted(quarantined.items()):
        if (kind, aid) not in declared or (kind, aid, version) in current:
            continue
        manifest = read_manifest(moved)
        try:
            source = TypeAdapter(Source).validate_python((manifest or {}).get("source"))
            files = tuple(FileEntry(path=f["path"], sha256=f["sha256"], size=f["size"]) for f in (manifest or {})["files"])
        except (ValidationError, KeyError, TypeError) as exc:
            log.warning("cannot rebuild %s/%s %s: its manifest does not say what it held (%s)", kind, aid, version, exc)
            continue
        wants.append(Want(kind, aid, version, source, files, dict((manifest or {}).get("metadata") or {})))
    return tuple(wants)
