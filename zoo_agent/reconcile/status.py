"""What the zoo holds against what the host's slice of the index declares (issue #3)."""

from __future__ import annotations

from typing import Any

from zoo_agent.plan import Desired, Observed

__all__ = ["artifact_status"]


def artifact_status(desired: Desired, observed: Observed) -> list[dict[str, Any]]:
    """One row per declared or present artifact; ``state`` says what is missing or drifted."""
    declared = {(w.kind, w.id): w.version for w in desired.wants}
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
            "state": _state(declared.get(key), seen is not None, current, have is not None, have.drifted if have else ()),
        })  # fmt: skip
    return rows


def _state(declared: str | None, present: bool, current: str | None, resolved: bool, drifted: tuple[str, ...]) -> str:
    if declared is None:
        return "undeclared"
    if not present or current is None:
        return "missing"
    if not resolved:
        return "broken: current points at a missing version"
    if drifted:
        return f"drifted: {', '.join(drifted[:3])}"
    if current != declared:
        return f"outdated: declared {declared}"
    return "ok"

