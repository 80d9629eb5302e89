"""Which tenants stay in memory: the paging decision, pure (issue #20).

The supervisor describes every live worker (loading, serving, draining: a draining worker's
memory is in use until its process exits) and asks what loading one more tenant takes.
The answer is measured in the footprints the index and the loaded models give, before
anything loads: never load and then find out. ``expired`` says which workers served nothing
for their tenant's ``keep_alive`` (issue #34).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from zoo_agent.formats import human_bytes

__all__ = ["Evict", "Live", "Load", "Refuse", "Wait", "decide", "expired"]

Policy = Literal["lru", "oldest"]  # "oldest": evict the first loaded (the naive baseline the benchmark compares)


@dataclass(frozen=True)
class Live:
    """A worker that holds (or is about to hold) memory."""

    tenant: str
    footprint: int
    pinned: bool = False
    busy: bool = False  # requests in flight or waiting for it: never evicted, it drains first
    evictable: bool = True  # serving (a loading or draining worker cannot be evicted)
    last_used: float = 0.0  # monotonic seconds
    loaded_at: float = 0.0
    draining: bool = False  # stopping: its memory comes back when its process exits
    keep_alive: float | None = None  # seconds it may serve nothing before it is unloaded (None: never)


@dataclass(frozen=True)
class Load:
    pass


@dataclass(frozen=True)
class Evict:
    """Drain these (least recently used first), then load once their processes exited."""

    victims: tuple[str, ...]


@dataclass(frozen=True)
class Wait:
    """Room will come when busy or draining workers finish; ask again."""

    reason: str


@dataclass(frozen=True)
class Refuse:
    reason: str


Decision = Load | Evict | Wait | Refuse


def decide(budget: int | None, live: Sequence[Live], tenant: str, need: int, policy: Policy = "lru",
           max_loaded: int | None = None) -> Decision:  # fmt: skip
    """What loading ``tenant`` (``need`` bytes) takes now, under the memory ``budget`` and the cap of
    ``max_loaded`` tenants loaded at once (a draining one no longer counts; a reload's two workers are one tenant)."""
    used = sum(w.footprint for w in live)
    loaded = {w.tenant for w in live if not w.draining and w.tenant != tenant}
    over = max(0, len(loaded) + 1 - max_loaded) if max_loaded is not None else 0  # tenants to page out for the cap
    if (budget is None or used + need <= budget) and not over:
        return Load()
    if budget is not None and need > budget:
        return Refuse(f"{tenant} needs {human_bytes(need)}; the memory budget is {human_bytes(budget)}")
    pinned = sum(w.footprint for w in live if w.pinned)
    if budget is not None and pinned + need > budget:
        return Refuse(f"{tenant} needs {human_bytes(need)}; pinned tenants hold {human_bytes(pinned)} of the {human_bytes(budget)} budget")
    held = sorted({w.tenant for w in live if w.pinned and w.tenant in loaded})
    if max_loaded is not None and len(held) >= max_loaded:
        return Refuse(f"{tenant} cannot load: the pinned tenants ({', '.join(held)}) fill max_loaded ({max_loaded})")
    coming = sum(w.footprint for w in live if w.draining)
    if not over and budget is not None and used - coming + need <= budget:
        # Evicted (or replaced) workers are exiting and their memory covers it: evicting more would page out a tenant for nothing.
        names = ", ".join(sorted({w.tenant for w in live if w.draining}))
        return Wait(f"{tenant} loads once {names} {'has' if ',' not in names else 'have'} stopped")
    order = sorted((w for w in live if not w.pinned and w.evictable and not w.busy),
                   key=lambda w: (w.last_used, w.loaded_at) if policy == "lru" else (w.loaded_at, w.last_used))  # fmt: skip
    victims: list[str] = []
    free = budget - used if budget is not None else need

    def enough() -> bool:
        return free >= need and len(victims) >= over

    for w in order:
        if enough():
            break
        if w.tenant in victims:
            continue
        victims.append(w.tenant)
        free += w.footprint
    if enough():
        return Evict(tuple(victims))
    others = ", ".join(sorted({w.tenant for w in live if not w.pinned and w.tenant not in victims})) or "none"
    if budget is None or (over and free >= need):
        return Wait(f"{tenant} waits for a place: {len(loaded)} tenants are loaded, max_loaded is {max_loaded}; "
                    f"waiting for busy tenants to finish ({others})")  # fmt: skip
    return Wait(f"{tenant} needs {human_bytes(need)}, {human_bytes(budget - used)} of the {human_bytes(budget)} budget is free; "
                f"waiting for busy tenants to finish ({others})")  # fmt: skip


def expired(live: Sequence[Live], now: float) -> tuple[str, ...]:
    """The tenants whose workers served nothing for their ``keep_alive`` (since their last request,
    or since they loaded): never a pinned, busy, loading or draining one."""
    return tuple(dict.fromkeys(
        w.tenant for w in live
        if w.keep_alive is not None and not w.pinned and not w.busy and w.evictable and not w.draining
        and now - max(w.last_used, w.loaded_at) >= w.keep_alive
    ))  # fmt: skip
