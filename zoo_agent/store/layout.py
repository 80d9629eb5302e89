"""The zoo's layout: where everything lives under its root (issue #3).

Layout::

    $ROOT/.lock
    $ROOT/host/actions.jsonl
    $ROOT/{models,loras}/<id>/versions/<version>/          complete, verified, manifest.json
    $ROOT/{models,loras}/<id>/versions/<version>.tmp.<pid>.<rand>/   staging, ours alone
    $ROOT/{models,loras}/<id>/{current,previous} -> versions/<version>
    $ROOT/quarantine/<kind>/<id>/<version>.<time>/       moved aside by verify --repair
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zoo_agent.plan import Kind

__all__ = ["STAGING_MARK", "Layout"]

STAGING_MARK = ".tmp."


@dataclass(frozen=True)
class Layout:
    """Every path of the zoo under ``root``; what ``Zoo`` does with them is in ``zoo.py``, ``staging.py`` and ``aliases.py``."""

    root: Path

    def artifact_dir(self, kind: Kind, aid: str) -> Path:
        return self.root / kind / aid

    def version_dir(self, kind: Kind, aid: str, version: str) -> Path:
        return self.artifact_dir(kind, aid) / "versions" / version

    @property
    def host_dir(self) -> Path:
        """Host-level state: survives tenant changes, never touched by gc."""
        return self.root / "host"

    @property
    def identity_file(self) -> Path:
        return self.host_dir / "identity.json"

    @property
    def applied_index(self) -> Path:
        """The index the zoo last matched (backups carry it)."""
        return self.host_dir / "applied-index.json"

    @property
    def actions_log(self) -> Path:
        return self.host_dir / "actions.jsonl"

    @property
    def resident_dir(self) -> Path:
        return self.root / "resident"

    @property
    def resident_state(self) -> Path:
        """What the supervisor serves now, for `zoo-agent resident reload` and status."""
        return self.resident_dir / "state.json"

    def tenant_dir(self, tenant: str) -> Path:
        """A tenant's resident state: model-info.json, lease.json, sessions/, kv-cache/."""
        return self.resident_dir / "tenants" / tenant

    @property
    def aliases_record(self) -> Path:
        """The alias links apply made (issue #35): the only ones it ever replaces or removes."""
        return self.host_dir / "aliases.json"

    def route_dir(self, route: str) -> Path:
        """A route's sessions (issue #21): conversations that move between its tenants' models."""
        return self.resident_dir / "routes" / route

