"""Paging helpers (issue #13): tenant settings that make paging visible, the footprint the
budget counts for the tiny model, a completion asked of a resident."""

from __future__ import annotations

from typing import Any

from tests.support.resident import Resident
from tests.support.world import World


GEN = {"generation": {"temperature": 0, "max_tokens": 4}, "resources": {"max_batch": 2, "max_queue": 4}}


def footprint(world: World) -> int:
    """What the budget counts for one tenant of the tiny model (the fit module's estimate)."""
    from zoo_agent.index.fit import read_config, tenant_footprint
    from zoo_agent.index.load import load_index

    idx = load_index(world.index, str(world.index))
    tid = next(iter(idx.tenants))
    return tenant_footprint(idx, tid, read_config(world.source_dir("m", "v1"))).total


def ask(r: Resident, tenant: str, prompt: str = "Hello there", **kw: Any) -> tuple[int, dict[str, Any]]:
    import httpx

    resp = httpx.post(r.url + "/v1/completions", json={"model": tenant, "prompt": prompt, **kw}, timeout=120)
    return resp.status_code, resp.json()
