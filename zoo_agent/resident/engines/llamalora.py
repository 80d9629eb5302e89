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

from zoo_agent.index.fit import GgufHeader, first_gguf, gguf_header, gguf_lora_rank
from zoo_agent.jsonbound import loads
from zoo_agent.resident.config import AdapterConfig, WorkerConfig
from zoo_agent.resident.engine.base import SET
from zoo_agent.resident.sessions.turns import Refusal
from zoo_agent.resident.wire.http import ApiError
from zoo_agent.resident.worker.adapter_sets import Offer, asked, on_step

__all__ = ["Loras", "adapter_files", "adapter_problem", "servable", "csv_field", "lora_argv", "lora_field", "loras_for", "with_lora"]

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


def adapter_problem(adapter: AdapterConfig, name: str, header: GgufHeader | None, model: GgufHeader | None) -> str | None:
    """Why ``llama-server`` would not load this GGUF adapter onto this model, checked as it checks
    (pure over both headers; ``model`` None: the adapter alone), or None. Refused here, the adapter
    is named in the ``Status:`` line and in 400s while the tenant serves without it; loaded by
    ``llama-server``, it would fail the tenant's start."""
    where = f"{adapter.label}: {name}"
    if header is None:
        return f"{where}: not a readable GGUF file"
    if header.fields.get("general.type") != "adapter" or header.fields.get("adapter.type") != "lora":
        return f"{where}: not a LoRA adapter (general.type '{header.fields.get('general.type')}'); convert_lora_to_gguf.py makes one"
    if (rank := gguf_lora_rank(header)) != adapter.rank:
        return f"{where}: rank is {rank}, the index declares rank {adapter.rank}"
    if model is None:
        return None
    if (arch := header.fields.get("general.architecture")) != (theirs := model.fields.get("general.architecture")):
        return f"{where}: built for a '{arch}' model; the tenant's model is '{theirs}'"
    for tensor, a_shape in header.shapes.items():
        if not tensor.endswith(".lora_a"):
            continue
        base = tensor.removesuffix(".lora_a")
        b_shape, weight = header.shapes.get(f"{base}.lora_b"), model.shapes.get(base)
        if weight is None:
            return f"{where}: the model has no tensor '{base}'"
        fits = b_shape is not None and len(a_shape) == len(b_shape) == len(weight) == 2 and a_shape[1] == b_shape[0]
        if not base.startswith("token_embd") and not (fits and b_shape and a_shape[0] == weight[0] and b_shape[1] == weight[1]):
            return f"{where}: '{base}' is {list(weight)} in the model; the adapter's A and B are {list(a_shape)} and {list(b_shape or ())}"
    return None


def servable(adapters: Sequence[AdapterConfig], model_file: Path | None) -> tuple[tuple[AdapterConfig, ...], dict[str, str]]:
    """The adapters ``llama-server`` can load onto the model in ``model_file``, and why each other is refused."""
    model = gguf_header(model_file) if model_file is not None else None
    served, refused = [], {}
    for adapter in adapters:
        found = first_gguf(adapter.dir)
        why = adapter_problem(adapter, found.name, gguf_header(found), model) if found is not None else f"{adapter.label}: no .gguf file"
        if why is None:
            served.append(adapter)
        else:
            refused[adapter.id] = why
    return tuple(served), refused


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
    first in it. The body passed ``front.check``: a JSON object, with ``model`` and without ``lora``
    (refused), so the field goes in after its opening brace, followed by a comma; the rest of its
    bytes are not encoded again (a 900 kB body: 1 ms here, where a new encoding took 6 ms more)."""
    if loras is None or not loras.order:
        return body
    field = lora_field(loads(body, limit=_BODY_LIMIT), names, loras)
    if not isinstance(field, list):
        return body
    brace = body.index(b"{") + 1  # only whitespace comes before it in a JSON document
    return body[:brace] + b'"lora":' + json.dumps(field, separators=(",", ":")).encode() + b"," + body[brace:]
