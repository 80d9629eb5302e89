"""What the zoo holds against what the host's slice of the index declares (issue #3)."""

from __future__ import annotations

from typing import Any

from zoo_agent.plan import Desired, Observed
from zoo_agent.store.zoo import Zoo, manifest_digest, read_manifest

__all__ = ["artifact_status", "healthy", "with_digests"]


def artifact_status(desired: Desired, observed: Observed) -> list[dict[str, Any]]:
    """One row per declared or present artifact; ``state`` says what is missing or drifted."""
    declared = {(w.kind, w.id): w.version for w in (*desired.on_demand, *desired.wants)}
    later = {(w.kind, w.id) for w in desired.on_demand}
    rows = []
    for key in sorted(set(declared) | set(observed.seen)):
        kind, aid = key
        seen = observed.seen.get(key)
        current = seen.current if seen else None
        have = seen.versions.get(current) if seen and current else None
        rows.append({
            "kind": kind, "id": aid, "declared": declared.get(key), "current": current,
            "previous": seen.previous if seen else None,
            "verified_at": have.verified_at if have else None,
            "size": sum(h.size for h in seen.versions.values()) if seen else 0,
            "versions": sorted(seen.versions) if seen else [],
            "state": _state(declared.get(key), seen is not None, current, have is not None, have.drifted if have else (), key in later),
        })  # fmt: skip
    return rows


def with_digests(zoo: Zoo, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with its current version's whole-version digest as the manifest records it
    (issue #35; computed from the manifest's files when an older apply did not record it)."""
    for row in rows:
        manifest = read_manifest(zoo.version_dir(row["kind"], row["id"], row["current"])) if row["current"] else None
        try:
            row["digest"] = (manifest.get("digest") or manifest_digest(manifest)) if manifest else None
        except (KeyError, TypeError):
            row["digest"] = None  # a damaged manifest: the row's state says so
    return rows


def healthy(state: str) -> bool:
    """Not a fault: the zoo is as the index wants it (an on-demand tenant waits for its first request)."""
    return state in ("ok", "undeclared") or state.startswith("on-demand")


def _state(declared: str | None, present: bool, current: str | None, resolved: bool, drifted: tuple[str, ...], on_demand: bool) -> str:
    if declared is None:
        return "undeclared"
    if not present or current is None:
        return "on-demand" if on_demand else "missing"  # fetched by its first request (issue #20)
    if on_demand and current != declared and resolved and not drifted:
        return f"on-demand: declared {declared}, fetched by the next request"
    if not resolved:
        return "broken: current points at a missing version"
    if drifted:
        return f"drifted: {', '.join(drifted[:3])}"
    if current != declared:
        return f"outdated: declared {declared}"
    return "ok"
