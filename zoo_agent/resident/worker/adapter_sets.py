"""What a request asks of its tenant's adapters (issues #6, #21, #36), decided before it is
queued: the base model, one adapter, ``<tenant>:auto`` (never an adapter in ``x_zoo.exclude``),
or a set the caller names, composed at the caller's scales (``<tenant>:a+b``, or ``model:
"<tenant>"`` with ``x_zoo.adapters: [{"name": "a", "scale": 0.5}, ...]``).

Pure: what the tenant offers in, a decision or a one-line refusal naming the adapter and its
field out. Only declared adapters that are not refused pass; adapters.py checks again what it
composes, since an apply may change the declared set between this decision and the generation.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from zoo_agent.resident.engine.base import AUTO, SET
from zoo_agent.resident.sessions.turns import Refusal
from zoo_agent.resident.worker.selection import WEIGHT_STEP

__all__ = ["MAX_SCALE", "SCALE_STEP", "Asked", "Offer", "asked", "on_step"]

#: A scale multiplies an adapter's delta (peft's add_weighted_adapter, "cat": exact for any scale).
#: Past twice its trained strength an adapter swamps the base weights (and in half precision its
#: products near overflow); a negative scale subtracts it (task arithmetic's negation).
MAX_SCALE = 2.0
#: Each distinct set of scales is a peft adapter of its own, built and cached (LRU, max_loras):
#: on a grid, as '<tenant>:auto' weights are, near-identical requests share one.
SCALE_STEP = WEIGHT_STEP


def on_step(scale: float) -> float | None:
    """``scale`` on the grid of SCALE_STEP (rounded to it, within float error), or None when it is not."""
    steps = scale / SCALE_STEP
    if not math.isfinite(steps) or abs(steps - round(steps)) > 1e-6:
        return None
    return round(round(steps) * SCALE_STEP, 4)


@dataclass(frozen=True)
class Offer:
    """A tenant's adapters, as a request's decision needs them."""

    tenant: str
    model: str  # the model id, which names the base model as the tenant's id does
    declared: Collection[str]  # ids (a dict's keys will do)
    refused: Mapping[str, str]  # id -> why
    max_loras: int  # adapters kept loaded at once: every adapter of a set is, while it is built
    auto: bool  # whether '<tenant>:auto' chooses (adapter_selection)


@dataclass(frozen=True)
class Asked:
    """What a request runs with: ``Request.adapter``, ``Request.scaled`` and ``Request.exclude``."""

    adapter: str | None  # a declared id, AUTO, SET, or None for the base model
    scaled: tuple[tuple[str, float], ...] = ()  # SET: (id, scale), in the caller's order
    exclude: frozenset[str] = frozenset()  # AUTO: never chosen


def asked(offer: Offer, model: str, adapters: Sequence[tuple[str, float]] | None = None, exclude: Sequence[str] = ()) -> Asked | Refusal:
    """The ``model`` field and the body's ``x_zoo.adapters`` (name, scale) and ``x_zoo.exclude``."""
    excluded: dict[str, str] = {}  # id -> the field that excludes it
    for i, aid in enumerate(exclude):
        if aid not in offer.declared:
            return _undeclared(offer, aid, f"x_zoo.exclude.{i}")
        excluded.setdefault(aid, f"x_zoo.exclude.{i}")
    out = frozenset(excluded)
    base = model in (offer.tenant, offer.model)
    if adapters is not None:
        if not base:
            return Refusal(400, f"x_zoo.adapters: a set is asked here with model '{offer.tenant}', or in model as '{offer.tenant}:a+b', "
                                f"not both (model is {model[:100]!r})", param="x_zoo.adapters")  # fmt: skip
        named = [(f"x_zoo.adapters.{i}.name", aid, scale) for i, (aid, scale) in enumerate(adapters)]
        return _set(offer, named, excluded, "x_zoo.adapters")
    if base:
        return Asked(None, exclude=out)
    tenant, sep, rest = model.partition(":")
    if sep and tenant == offer.tenant:
        if rest == "auto" and offer.auto:
            return Asked(AUTO, exclude=out)
        if "+" in rest:
            count = rest.count("+") + 1  # counted before it is split: a 1 MiB model of '+' is not half a million names
            if not offer.declared:
                return _undeclared(offer, rest.partition("+")[0], "model")
            if count > offer.max_loras:
                return _too_many(offer, count, "model")
            return _set(offer, [("model", aid, 1.0) for aid in rest.split("+")], excluded, "model")
        if rest in offer.declared:
            if rest in offer.refused:
                return Refusal(400, f"model: adapter refused: {offer.refused[rest]}", param="model", code="adapter_refused")
            if rest in excluded:
                return _excluded(rest, "model", excluded)
            return Asked(rest, exclude=out)
    return Refusal(404, f"model {model[:100]!r} is not served here (serving '{offer.tenant}')", param="model", code="model_not_found")


def _set(offer: Offer, named: list[tuple[str, str, float]], excluded: dict[str, str], field: str) -> Asked | Refusal:
    """(field, id, scale) of each adapter in a set: each declared, not refused, not excluded, named once."""
    if not named:  # the body's min_length says so too; never a set of nothing
        return Refusal(400, f"{field}: an empty set; name at least one adapter", param=field)
    if offer.declared and len(named) > offer.max_loras:
        return _too_many(offer, len(named), field)
    seen: dict[str, str] = {}
    for where, aid, _ in named:
        if aid not in offer.declared:
            return _undeclared(offer, aid, where)
        if aid in offer.refused:
            return Refusal(400, f"{where}: adapter {aid!r} is refused: {offer.refused[aid]}", param=where, code="adapter_refused")
        if aid in excluded:
            return _excluded(aid, where, excluded)
        if aid in seen:
            also = f" (also {seen[aid]})" if seen[aid] != where else ""
            return Refusal(400, f"{where}: adapter {aid!r} is named twice{also}", param=where)
        seen[aid] = where
    if len(named) == 1 and named[0][2] == 1.0:
        return Asked(named[0][1], exclude=frozenset(excluded))  # one adapter at its own scale: that adapter
    return Asked(SET, tuple((aid, scale) for _, aid, scale in named), frozenset(excluded))


def _undeclared(offer: Offer, aid: str, where: str) -> Refusal:
    declared = ", ".join(sorted(offer.declared)) or "none"
    return Refusal(400, f"{where}: adapter {aid[:100]!r} is not declared for tenant '{offer.tenant}' (declared: {declared})", param=where,
                   code="adapter_not_declared")  # fmt: skip


def _excluded(aid: str, where: str, excluded: dict[str, str]) -> Refusal:
    return Refusal(400, f"{where}: adapter {aid!r} is excluded by {excluded[aid]}", param=where, code="adapter_excluded")


def _too_many(offer: Offer, count: int, field: str) -> Refusal:
    return Refusal(400, f"{field}: a set of {count} adapters; at most {offer.max_loras}, the adapters this tenant keeps loaded at once "
                        "(resources.max_loras)", param=field)  # fmt: skip
