"""A tenant's adapters and adapter selection, resolved against the zoo (issue #6).

The supervisor calls these: only what the index declares, at the version `current`
names, and only once its bytes match the manifest, reaches a worker. A missing or
damaged adapter is refused with a reason; the tenant is served without it.
"""

from __future__ import annotations

from zoo_agent.errors import IntegrityError, UsageError
from zoo_agent.index.fit import first_gguf
from zoo_agent.index.model import HfSource, Index
from zoo_agent.plan import Kind
from zoo_agent.reconcile.verify import verify
from zoo_agent.resident.config import AdapterConfig, SelectionConfig
from zoo_agent.resident.engines.llamalora import servable
from zoo_agent.store.zoo import Zoo

__all__ = ["adapters_for", "base_names", "selection_for", "strict_check"]


def adapters_for(zoo: Zoo, idx: Index, tenant_id: str) -> tuple[tuple[AdapterConfig, ...], dict[str, str]]:
    """(adapters to serve, {id: why refused})."""
    tenant = idx.tenants[tenant_id]
    served: list[AdapterConfig] = []
    refused: dict[str, str] = {}
    for lid in tenant.loras:
        entry = idx.loras[lid]
        version = zoo.read_link("loras", lid, "current")
        if version is None or not zoo.version_dir("loras", lid, version).is_dir():
            refused[lid] = f"{lid}: not in the zoo at {zoo.root}; run: zoo-agent apply"
            continue
        report = verify(zoo, [("loras", lid, version)], jobs=2)
        if report.findings:
            refused[lid] = f"{lid}@{version}: failed verification: {report.findings[0].line(zoo)}"
            continue
        served.append(AdapterConfig(id=lid, version=version, dir=zoo.version_dir("loras", lid, version), rank=entry.rank,
                                    description=entry.description, tags=tuple(entry.tags)))  # fmt: skip
    if tenant.backend == "llama.cpp" and served:  # its GGUF adapters against the model's header, as llama-server checks them
        model_version = zoo.read_link("models", tenant.model, "current")
        model_file = first_gguf(zoo.version_dir("models", tenant.model, model_version)) if model_version is not None else None
        kept, bad = servable(served, model_file)
        return kept, {**refused, **bad}
    return tuple(served), refused


def base_names(idx: Index, tenant_id: str) -> tuple[str, ...]:
    """What an adapter_config.json may call this tenant's base model: its id, or its hub repository."""
    model_id = idx.tenants[tenant_id].model
    source = idx.models[model_id].source
    return (model_id, source.repo) if isinstance(source, HfSource) else (model_id,)


def selection_for(zoo: Zoo, idx: Index, tenant_id: str) -> SelectionConfig | None:
    selection = idx.tenants[tenant_id].adapter_selection
    if selection is None:
        return None
    mid = selection.embedding_model
    version = zoo.read_link("models", mid, "current")
    if version is None:
        return None  # `<tenant>:auto` is not offered until apply has published it
    return SelectionConfig(embedding_dir=zoo.version_dir("models", mid, version), embedding_label=f"{mid}@{version}", threshold=selection.threshold,
                           max_adapters=selection.max_adapters, combine=selection.combine)  # fmt: skip


def strict_check(zoo: Zoo, idx: Index, tenant_id: str) -> None:
    """--strict: serve exactly the declared, verified versions or nothing (never something stale)."""
    if not zoo.root.is_dir():
        raise UsageError(f"strict: the zoo at {zoo.root} is not available")
    tenant = idx.tenants[tenant_id]
    wanted: list[tuple[Kind, str, str]] = [("models", tenant.model, idx.models[tenant.model].version)]
    wanted += [("loras", lid, idx.loras[lid].version) for lid in tenant.loras]
    for kind, aid, declared in wanted:
        current = zoo.read_link(kind, aid, "current")
        if current != declared:
            raise UsageError(f"strict: {kind[:-1]} {aid} is at {current or 'no version'}, the index declares {declared}; run: zoo-agent apply")
    report = verify(zoo, wanted, jobs=4)
    if report.findings:
        raise IntegrityError(f"strict: {report.findings[0].line(zoo)}" + (f" (and {len(report.findings) - 1} more)" if len(report.findings) > 1 else ""))
