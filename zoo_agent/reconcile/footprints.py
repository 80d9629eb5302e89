"""Each served tenant's footprint, with config.json from wherever it already is (issue #20).

``plan`` reads what the zoo holds and leaves the KV part unknown for a version not yet
fetched; ``apply`` also reads the declared config.json from the source, into memory and
checked against its sha256, so the fit is proven before any file is staged or any
``current`` link moves: a refused host's zoo is byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zoo_agent.errors import IntegrityError, InvalidIndex, SourceError
from zoo_agent.formats import parse_memory
from zoo_agent.index.fit import Footprint, check_host, pinned_tenants, read_config, tenant_footprint
from zoo_agent.index.model import FileEntry, Index, ModelEntry
from zoo_agent.plan import Observed, holdings
from zoo_agent.sources import FetchSettings, open_source
from zoo_agent.store.zoo import Zoo

__all__ = ["CONFIG", "TenantFit", "fit_document", "prove_fit", "proven_fits", "tenant_fits"]

log = logging.getLogger("zoo_agent")

CONFIG = "config.json"
_CONFIG_MAX = 64 << 20  # a config.json is kilobytes; a larger declared one is not read into memory

#: Where a tenant's config.json came from: the published version, the same bytes held by
#: another version, the source (apply), none declared (Ollama: KV counted 0), or not known yet.
Origin = Literal["zoo", "reused", "source", "none", "unknown"]


@dataclass(frozen=True)
class TenantFit:
    tenant: str
    footprint: Footprint
    config: Origin

    @property
    def kv_known(self) -> bool:
        return self.config != "unknown"


def tenant_fits(idx: Index, host_id: str, zoo: Zoo, observed: Observed, *, fetch: FetchSettings | None = None,
                index_dir: Path | None = None, tenants: tuple[str, ...] | None = None) -> dict[str, TenantFit]:  # fmt: skip
    """Footprints of the host's served tenants (or of ``tenants``); ``fetch`` reads config.json
    from the source when the zoo holds no copy of it (``index_dir`` resolves file sources)."""
    held: dict[tuple[str, int], Any] = {}  # filled on first need: a no-op plan pays nothing for it (issue #23)
    fits = {}
    for tid in tenants if tenants is not None else idx.hosts[host_id].served():
        tenant = idx.tenants[tid]
        if tenant.is_remote:
            continue  # a server elsewhere answers for it (backend 'openai'): it holds no memory here
        model = idx.models[tenant.model]
        config, origin = _config(zoo, observed, held, tenant.model, model)
        if origin == "unknown" and fetch is not None and index_dir is not None:
            config, origin = _from_source(model, index_dir, fetch, eager=tenant.fetch == "eager", tenant=tid)
        fits[tid] = TenantFit(tid, tenant_footprint(idx, tid, config), origin)
    return fits


def _declared(model: ModelEntry) -> FileEntry | None:
    return next((f for f in model.files if f.path == CONFIG), None)


def _config(zoo: Zoo, observed: Observed, held: dict[tuple[str, int], Any], aid: str,
            model: ModelEntry) -> tuple[dict[str, Any] | None, Origin]:  # fmt: skip
    entry = _declared(model)
    if entry is None:
        return None, "none"
    seen = observed.seen.get(("models", aid))
    if seen is not None and (have := seen.versions.get(model.version)) is not None and have.pins is not None:
        return read_config(zoo.version_dir("models", aid, model.version)), "zoo"
    if not held:
        held.update(holdings(observed))
    for origin in held.get((entry.sha256, entry.size), ()):
        path = zoo.version_dir(origin.kind, origin.id, origin.version) / origin.path
        if (data := _read_verified(path, entry)) is not None:
            return _parse(data), "reused"
    return None, "unknown"


def _read_verified(path: Path, entry: FileEntry) -> bytes | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if len(data) == entry.size and hashlib.sha256(data).hexdigest() == entry.sha256 else None


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        config = json.loads(data)
    except ValueError:
        return None
    return config if isinstance(config, dict) else None


def _from_source(model: ModelEntry, index_dir: Path, settings: FetchSettings, *, eager: bool, tenant: str) -> tuple[dict[str, Any] | None, Origin]:
    """The declared config.json over the model's own source, verified like any staged file.

    A failure stops an eager tenant's apply (its fit cannot be proven, so nothing may
    switch); an on-demand tenant's fetch proves its fit again before it switches, so here
    it counts its weights only."""
    entry = _declared(model)
    assert entry is not None
    if entry.size > _CONFIG_MAX:
        return None, "unknown"
    try:
        source = open_source(model.source, index_dir, settings)
        data = b"".join(source.read(entry.path))
        actual = hashlib.sha256(data).hexdigest()
        if len(data) != entry.size or actual != entry.sha256:
            raise IntegrityError(f"{source.describe()}/{entry.path}: sha256 {actual} ({len(data)} bytes), expected {entry.sha256} "
                                 f"({entry.size} bytes)", file=entry.path, expected=entry.sha256, actual=actual)  # fmt: skip
    except (SourceError, IntegrityError) as exc:
        if eager:
            raise
        log.warning("tenant %s: cannot read its config.json to size its KV cache (%s); counting its weights only", tenant, exc)
        return None, "unknown"
    return _parse(data), "source"


def prove_fit(idx: Index, host_id: str, fits: dict[str, TenantFit], index_file: str) -> None:
    """Bad input when the tenants cannot fit: exit 2, the budget's pointer, the numbers."""
    if problems := check_host(idx, host_id, {t: f.footprint for t, f in fits.items()}):
        raise InvalidIndex(index_file, problems)


def fit_document(idx: Index, host_id: str, fits: dict[str, TenantFit]) -> dict[str, Any]:
    """The ``fit`` object of ``plan --json``: per tenant weights/kv/total, the budget, the pinned sum."""
    budget = idx.hosts[host_id].memory_budget
    pinned = [t for t in pinned_tenants(idx, host_id) if t in fits]
    return {
        "budget": parse_memory(budget) if budget else None,
        "budget_spec": budget,
        "pinned": pinned,
        "pinned_total": sum(fits[t].footprint.total for t in pinned),
        "problems": [p.message for p in check_host(idx, host_id, {t: f.footprint for t, f in fits.items()})],
        "tenants": {t: {"weights": f.footprint.weights, "kv": f.footprint.kv if f.kv_known else None,
                        "total": f.footprint.total, "kv_known": f.kv_known, "config": f.config} for t, f in fits.items()},
    }  # fmt: skip


def proven_fits(idx: Index, host_id: str, zoo: Zoo, observed: Observed, index_file: Path, settings: FetchSettings,
                fetch_for: tuple[str, ...]) -> dict[str, TenantFit]:  # fmt: skip
    """What ``apply`` runs before its first step: the footprints of every served tenant, the
    config.json of ``fetch_for`` read from the source where the zoo has none, and InvalidIndex
    when they cannot fit. A host without a budget has nothing to prove (and reads nothing)."""
    if idx.hosts[host_id].memory_budget is None:
        return {}
    fits = tenant_fits(idx, host_id, zoo, observed)
    if missing := tuple(t for t in fetch_for if t in fits and not fits[t].kv_known):
        fits.update(tenant_fits(idx, host_id, zoo, observed, fetch=settings, index_dir=index_file.resolve().parent, tenants=missing))
    prove_fit(idx, host_id, fits, str(index_file))
    return fits
