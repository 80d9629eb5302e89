"""Peers (issue #22): who else in the fleet serves a tenant, derived from the index; which
of them to ask, from their health. Pure: no sockets, no clock (``now`` is passed in).

The table is never written by hand: every host that serves a tenant and accepts it from
peers (``hosts.<h>.accept_from_peers``, at its ``endpoint``) is a peer for that tenant. Each
entry carries the digest of what the index pins for the tenant, which a peer reports in its
``/v1/models`` (``x_zoo.digest``) from its own index, so "serves exactly what is pinned" is
one string comparison, not a trust decision.

Failures follow LiteLLM's router: more than ``allowed_fails`` failures within a minute put
a peer in cooldown for ``cooldown_time`` seconds, during which nobody picks it. Unlike
LiteLLM, a success clears the count, so failures must come close together to count.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from zoo_agent.index.digest import artifact_doc, digest_of
from zoo_agent.index.model import Index
from zoo_agent.resident.wire.documents import Card, CardZoo

__all__ = ["FAIL_WINDOW", "Peer", "PeerHealth", "State", "choose_peer", "peer_table", "pinned", "served_state", "tenant_digest", "undeclared"]

#: Seconds over which failures are counted (LiteLLM counts them per minute).
FAIL_WINDOW = 60.0


@dataclass(frozen=True)
class Peer:
    """One other host that answers ``tenant`` for peers, and what the index pins for it there."""

    host: str
    tenant: str
    endpoint: str
    model: str  # "<model>@<version>"
    digest: str  # "sha256:<hex>", see tenant_digest

    @property
    def key(self) -> tuple[str, str]:
        """What health is kept per: one tenant at one host (LiteLLM's "deployment")."""
        return self.host, self.tenant


def tenant_digest(idx: Index, tenant: str) -> str:
    """sha256 over canonical JSON (sorted keys, no spaces, ASCII) of the tenant's model
    (id, version, sorted [path, sha256] pairs) and its adapters likewise, sorted by id.

    Only pinned facts go in, never paths or settings, so two hosts whose indexes pin the
    same bytes report the same digest, whatever else differs between their indexes.
    """
    entry = idx.tenants[tenant]
    doc = {"model": artifact_doc(entry.model, idx.models[entry.model]),
           "loras": [artifact_doc(lid, idx.loras[lid]) for lid in sorted(entry.loras)]}  # fmt: skip
    return digest_of(doc)


def pinned(idx: Index, tenant: str) -> str:
    """``<model>@<version>`` as the index pins it for the tenant."""
    model = idx.tenants[tenant].model
    return f"{model}@{idx.models[model].version}"


def undeclared(idx: Index, name: str) -> str | None:
    """Why ``name`` (``tenant``, ``tenant:adapter`` or ``tenant:auto``) is nothing the index declares;
    None when it is. A peer could only answer 404 for such a name: the router answers it at once."""
    tenant, sep, adapter = name.partition(":")
    entry = idx.tenants.get(tenant)
    if entry is None:
        return f"'{name[:100]}' is not a tenant of the index"
    if not sep or adapter in entry.loras or (adapter == "auto" and entry.adapter_selection is not None):
        return None
    declared = ", ".join([*entry.loras, *(["auto"] if entry.adapter_selection is not None else [])]) or "none"
    return f"'{name[:100]}': tenant '{tenant}' declares no adapter '{adapter[:100]}' (declared: {declared})"


def peer_table(idx: Index, host: str) -> dict[str, list[Peer]]:
    """For every tenant with at least one peer: the hosts other than ``host`` that serve it and
    accept it from peers at an endpoint, in the index's host order. Whether ``host`` may
    delegate a tenant (it does not serve it, or it overflows) is the router's decision."""
    table: dict[str, list[Peer]] = {}
    for hid, entry in idx.hosts.items():
        if hid == host or entry.endpoint is None:
            continue
        served = set(entry.served())
        for tid in entry.accept_from_peers:
            if tid in served and tid in idx.tenants:
                peer = Peer(hid, tid, entry.endpoint, pinned(idx, tid), tenant_digest(idx, tid))
                table.setdefault(tid, []).append(peer)
    return table


@dataclass(frozen=True)
class PeerHealth:
    """What the router knows of its peers: recent failures, cooldowns, the load each reported.
    A value: every verb returns a new one, so a decision can be replayed from its inputs."""

    allowed_fails: int = 3
    cooldown_time: float = 5.0
    fails: Mapping[tuple[str, str], tuple[float, ...]] = field(default_factory=dict)
    cooling_until: Mapping[tuple[str, str], float] = field(default_factory=dict)
    busy: Mapping[tuple[str, str], int] = field(default_factory=dict)

    def failed(self, peer: Peer, now: float) -> PeerHealth:
        """A request to the peer failed before its answer started; the one too many cools it down."""
        recent = (*(t for t in self.fails.get(peer.key, ()) if now - t < FAIL_WINDOW), now)
        if len(recent) > self.allowed_fails:
            return replace(self, fails=_without(self.fails, peer.key), cooling_until={**self.cooling_until, peer.key: now + self.cooldown_time})
        return replace(self, fails={**self.fails, peer.key: recent})

    def succeeded(self, peer: Peer, now: float) -> PeerHealth:
        """The peer answered: its failures are forgotten (an ongoing cooldown still runs out)."""
        return replace(self, fails=_without(self.fails, peer.key))

    def polled(self, peer: Peer, busy: int) -> PeerHealth:
        """The peer's ``/health`` said this many requests run or wait for the tenant."""
        return replace(self, busy={**self.busy, peer.key: busy})

    def cooling(self, peer: Peer, now: float) -> bool:
        return self.cooldown_left(peer, now) > 0

    def cooldown_left(self, peer: Peer, now: float) -> float:
        """Seconds until the peer may be picked again (0: it may); what ``Status:`` shows."""
        return max(0.0, self.cooling_until.get(peer.key, now) - now)


def _without(mapping: Mapping[tuple[str, str], Any], key: tuple[str, str]) -> dict[tuple[str, str], Any]:
    return {k: v for k, v in mapping.items() if k != key}


def choose_peer(peers: Iterable[Peer], health: PeerHealth, now: float) -> list[Peer]:
    """The peers to try, in order: not cooling down, least busy first, ties in the table's
    order. A peer not polled yet counts as idle: it is asked, and its load is then known."""
    ready = [(i, p) for i, p in enumerate(peers) if not health.cooling(p, now)]
    ready.sort(key=lambda ip: (health.busy.get(ip[1].key, 0), ip[0]))
    return [p for _, p in ready]


#: How a peer's answer compares with the index; "unreachable" is for who could not ask.
State = Literal["ok", "wrong version", "digest differs", "unreachable", "not served"]


def served_state(model: str, digest: str, card: Card | None) -> State:
    """Compare one ``/v1/models`` card with what the index pins (``model@version``, digest):
    the version first (the usual drift, and the clearer message), then the bytes. A card
    without our ``x_zoo`` (an agent from before issue #22, another server) vouches for nothing."""
    if card is None:
        return "not served"
    x_zoo = card.x_zoo or CardZoo()
    served = x_zoo.model if "model" in x_zoo.model_fields_set else card.root
    if served != model:
        return "wrong version"
    if x_zoo.digest != digest:
        return "digest differs"
    return "ok"
