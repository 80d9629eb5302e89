"""A llama.cpp tenant's LoRA adapters: loaded at its start, chosen per request (issue #33).

``llama-server`` loads every adapter the tenant serves at its start (``--lora PATH`` each, in the
order of ``WorkerConfig.adapters``: they are its adapters 0, 1, ...) and applies them per request
by its ``lora`` field, ``[{"id": N, "scale": S}]`` (an adapter left out of a non-empty list has
scale 0). A request names them as on a transformers tenant, and the same pure decision
(``worker/adapter_sets.asked``) answers it, with the same refusals: ``<tenant>:<adapter>``,
``<tenant>:a+b``, and ``x_zoo.adapters`` at the caller's scales (a scale multiplies the adapter's
delta in both engines).

The front sets ``lora`` on every generation of a tenant with adapters, the base model's too (each
adapter at 0): this llama-server's ``--lora-init-without-apply`` only skips applying the adapters
to its context at the start, and a request that says nothing gets them at their loaded scale, 1.
A client's own ``lora`` is refused: it chooses adapters by position, past the names, the
exclusions and the refusals. ``<tenant>:auto`` is refused too: choosing needs the tenant's
embedding model (``worker/selection.py``), which runs in a transformers worker, not beside
``llama-server``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoo_agent.index.fit import first_gguf
from zoo_agent.jsonbound import loads
from zoo_agent.resident.config import AdapterConfig, WorkerConfig
from zoo_agent.resident.engine.base import SET
from zoo_agent.resident.sessions.turns import Refusal
from zoo_agent.resident.wire.http import ApiError
from zoo_agent.resident.worker.adapter_sets import Offer, asked, on_step

__all__ = ["Loras", "adapter_files", "csv_field", "lora_argv", "lora_field", "loras_for", "with_lora"]

#: The body's bound, as the front reads it (``front.BODY_LIMIT``: the router's, and room for a route's re-encoding).
_BODY_LIMIT = 2 << 20


@dataclass(frozen=True)
class Loras:
    """What the front decides a request's adapters by: the tenant's offer, and its adapters' ids in ``--lora`` order."""

    offer: Offer
    order: tuple[str, ...]


def loras_for(config: WorkerConfig) -> Loras:
    """The tenant's served adapters (``config.adapters``, the order of its command line) and the refused
    ones, declared too: asked for, one is a 400 saying why it is refused (pure)."""
    order = tuple(a.id for a in config.adapters)
    declared = (*order, *(aid for aid in config.refused_adapters if aid not in order))
    return Loras(Offer(config.tenant, config.model, declared, dict(config.refused_adapters), config.max_loras, auto=False), order)


def adapter_files(adapters: Sequence[AdapterConfig]) -> list[Path] | str:
    """Each adapter's GGUF file (its version holds one: ``validate``), or why one has none."""
    files = []
    for adapter in adapters:
        found = first_gguf(adapter.dir)
        if found is None:
            return f"adapter {adapter.label}: no .gguf file in {adapter.dir}"
        files.append(found)
    return files


def csv_field(text: str) -> str:
    """``text`` as one field of llama.cpp's comma-separated argument (``--lora a.gguf,b.gguf``): quoted,
    its quotes doubled, so that a comma in a zoo's path is never a second adapter (pure)."""
    return '"' + text.replace('"', '""') + '"'


def lora_argv(files: Sequence[Path]) -> list[str]:
    """``--lora FILE`` for each adapter, in order (their ids), loaded without being applied (pure)."""
    argv = [arg for path in files for arg in ("--lora", csv_field(str(path)))]
    return [*argv, "--lora-init-without-apply"] if argv else []


def lora_field(document: dict[str, Any], names: tuple[str, ...], loras: Loras | None) -> list[dict[str, Any]] | None | ApiError:
    """A generation's ``lora`` field for llama-server (pure): every adapter of the tenant, each at the
    scale the request asks (0 where it asks none); None for a tenant without adapters (nothing to
    add); an ``ApiError`` naming the field where the request cannot be served as asked. ``names``:
    what ``model`` may say for the base model (the tenant, its model's id)."""
    if "lora" in document:
        return ApiError(400, f"lora: adapters are chosen by name: model '{names[0]}:<adapter>', or x_zoo.adapters", "lora")
    model = document["model"]
    tenant, sep, rest = model.partition(":")
    if sep and tenant in names and rest == "auto":
        return ApiError(400, f"model: '{names[0]}:auto' is not available on a llama.cpp tenant yet: choosing needs the embedding model, "
                             f"which runs in a transformers worker; name the adapter ('{names[0]}:<adapter>') or a set", "model", "not_supported")  # fmt: skip
    offer = loras.offer if loras is not None else Offer(names[0], names[-1], (), {}, 0, auto=False)
    raw = document.get("x_zoo")
    x_zoo: dict[str, Any] = raw if isinstance(raw, dict) else {}
    scaled = x_zoo.get("adapters")  # as front.check validated it (bodies.XZoo): names, and scales on the grid
    pairs = [(str(a["name"]), on_step(float(a.get("scale", 1.0))) or 1.0) for a in scaled] if isinstance(scaled, list) else None
    decision = asked(offer, model, pairs, [str(x) for x in x_zoo.get("exclude") or ()])
    if isinstance(decision, Refusal):
        return ApiError(decision.status, decision.message, decision.param, decision.code)
    order = loras.order if loras is not None else ()
    if not order:
        return None
    if decision.adapter is None:
        wanted: dict[str, float] = {}  # the base model
    elif decision.adapter == SET:
        wanted = dict(decision.scaled)
    else:
        wanted = {decision.adapter: 1.0}
    return [{"id": i, "scale": wanted.get(aid, 0.0)} for i, aid in enumerate(order)]


def with_lora(body: bytes, names: tuple[str, ...], loras: Loras | None) -> bytes:
    """The body llama-server is sent: as it came for a tenant without adapters, else with ``lora``
    set (the body passed ``front.check``, which refused what ``lora_field`` refuses)."""
    if loras is None or not loras.order:
        return body
    document = loads(body, limit=_BODY_LIMIT)
    field = lora_field(document, names, loras)
    if not isinstance(field, list):
        return body
    return json.dumps({**document, "lora": field}).encode()
