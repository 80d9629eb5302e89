"""The router's view of its peers (issue #22): who may answer a tenant this host does not serve
(or overflows), whether each serves exactly what the index pins, and how busy and healthy it is.

The table comes from the index (``peers.peer_table``), never from the peers. Every
``poll_seconds`` each peer host is asked for ``/health`` and ``/v1/models`` with the fleet
key; a tenant's card must report the ``model@version`` and digest this host's index pins
for it, or that peer is refused for that tenant (counted, shown in ``Status:`` and
``/health``) until a later poll says otherwise. Both answers are read as the typed documents of
``wire/documents.py``: a field of the wrong type refuses the peer as malformed, naming the field.
Requests that fail before their first token
count toward LiteLLM-style cooldowns (``PeerHealth``); a poll that cannot reach a host
counts as a failure for each of its tenants, so a host whose link went down cools down, and
comes back when a poll reaches it again and its cooldown ran out.

All of it runs on the router's event loop: no locks; ``take_index`` (the supervisor's thread)
replaces the table in one assignment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge

from zoo_agent.jsonbound import loads
from zoo_agent.resident.router.peers import Peer, PeerHealth, choose_peer, peer_table, served_state
from zoo_agent.resident.router.upstream import Fallback, decoded
from zoo_agent.resident.wire.documents import Health, Malformed, ModelList, validate
from zoo_agent.resident.wire.headers import PEER

if TYPE_CHECKING:
    from zoo_agent.index.model import Index

__all__ = ["Federation"]

log = logging.getLogger("zoo_agent.resident")

#: Milliseconds a peer connection may leave data unacknowledged before the kernel aborts it
#: (Linux's TCP_USER_TIMEOUT). A peer whose link went down leaves pooled connections that look
#: open; without this, a request sent on one waits for its head forever and never fails over
#: (found by the fleet test: tests/integration/test_fleet.py, a cut cable). A slow answer is
#: unaffected: a peer that is generating still acknowledges what it was sent.
_UNACKED_MS = 3000
_SOCKET_OPTIONS = [(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, _UNACKED_MS)] if hasattr(socket, "TCP_USER_TIMEOUT") else []


@dataclass
class View:
    """What the last poll said of one tenant at one peer, against which pin (a new index re-asks)."""

    state: str = "unknown"  # ok | refused | unreachable | unknown (not polled yet)
    reason: str | None = None
    digest: str = ""

#: The most a peer's /health or /v1/models may be (a peer's answer is input like any other).
MAX_POLL_BYTES = 4 << 20


class Federation:
    def __init__(self, host: str, fleet_key: str | None, registry: CollectorRegistry, poll_seconds: float = 1.0) -> None:
        self.host, self.fleet_key, self.poll_seconds = host, fleet_key, poll_seconds
        self.table: dict[str, list[Peer]] = {}
        self.accepts: frozenset[str] = frozenset()  # tenants this host answers for peers
        self.health = PeerHealth()
        self.views: dict[tuple[str, str], View] = {}
        self.polled = asyncio.Event()
        self.series: set[tuple[str, str]] = set()  # the (peer, tenant) label pairs of the gauges
        self.clients: dict[str, httpx.AsyncClient] = {}
        # (host, tenant) -> attempts to give up when a poll finds that peer gone or refused for that tenant: a host
        # refused for one tenant (mid-rollout, another version of it) still answers for the others (issue #31).
        self.watchers: dict[tuple[str, str], set[asyncio.Future[str]]] = {}
        r = registry
        self.requests = Counter("zoo:peer_requests", "Requests delegated to a peer, by the status it answered.", ["peer", "tenant", "code"], registry=r)
        self.refusals = Counter("zoo:peer_refusals", "Peers not used for a tenant, by why (wrong_version, digest_differs, not_served, "
                                "unauthorized, unreachable, malformed).", ["peer", "tenant", "reason"], registry=r)  # fmt: skip
        self.failovers = Counter("zoo:peer_failovers", "Delegated requests that went to the next peer before their first token.",
                                 ["peer", "tenant"], registry=r)  # fmt: skip
        self.up = Gauge("zoo:peer_up", "1 while the last poll reached the peer host.", ["peer"], registry=r)
        self.refused = Gauge("zoo:peer_refused", "1 while the last poll refused the peer for the tenant (wrong version, digest differs, "
                             "not served, our key refused, a malformed answer); what the alert watches.", ["peer", "tenant"], registry=r)  # fmt: skip

    # -- the supervisor's thread ---------------------------------------------------------------
    def take_index(self, idx: Index, host: str | None = None) -> None:
        """``host``: this host's id in ``idx``, as the supervisor resolved it (a hostname
        ``box.lan`` is the index's ``box``); the one given at construction otherwise."""
        self.host = host or self.host
        self.table = peer_table(idx, self.host)
        # Every series an alert reads exists from the start (at 0), and none outlives its peer.
        series = {p.key for peers in self.table.values() for p in peers}
        for host, tenant in self.series - series:
            self.refused.remove(host, tenant)
        for host in {h for h, _ in self.series} - {h for h, _ in series}:
            self.up.remove(host)
        for host, tenant in series:
            self.refused.labels(host, tenant).inc(0)
            self.up.labels(host).inc(0)
        self.series = series
        self.accepts = frozenset(idx.hosts[self.host].accept_from_peers) if self.host in idx.hosts else frozenset()

    # -- the router's loop ---------------------------------------------------------------------
    def peers_of(self, tenant: str) -> list[Peer]:
        return self.table.get(tenant, [])

    def candidates(self, tenant: str) -> list[Peer]:
        """The peers to try for ``tenant``, in order: verified by the last poll, not cooling down, least busy first."""
        ok = [p for p in self.peers_of(tenant) if self._view_of(p).state == "ok"]
        return choose_peer(ok, self.health, time.monotonic())

    def unusable(self, tenant: str, besides: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Why each peer of ``tenant`` that is not a candidate is not: for the 503 that names them
        (``besides``: hosts the 503 already names, with what they answered)."""
        now, out = time.monotonic(), []
        for p in self.peers_of(tenant):
            if p.host in besides:
                continue
            view = self._view_of(p)
            if view.state != "ok":
                out.append(f"{p.host}: {view.state}" + (f" ({view.reason})" if view.reason else ""))
            elif self.health.cooling(p, now):
                out.append(f"{p.host}: cooling down {self.health.cooldown_left(p, now):.0f}s")
        return out

    def failed(self, peer: Peer) -> None:
        self.health = self.health.failed(peer, time.monotonic())
        self.failovers.labels(peer.host, peer.tenant).inc()

    def answered(self, peer: Peer, code: int) -> None:
        self.health = self.health.succeeded(peer, time.monotonic())
        self.requests.labels(peer.host, peer.tenant, str(code)).inc()

    def headers(self) -> list[tuple[bytes, bytes]]:
        """What a delegated request (and a poll) carries: the fleet key, never a client's."""
        out = [(PEER.lower().encode(), self.host.encode()), (b"accept-encoding", b"identity")]  # uncompressed: nothing to inflate
        if self.fleet_key is not None:
            out.append((b"authorization", b"Bearer " + self.fleet_key.encode()))
        return out

    def client(self, endpoint: str) -> httpx.AsyncClient:
        client = self.clients.get(endpoint)
        if client is None:
            # No read timeout (an answer streams as long as it takes; the router bounds the first token).
            timeout = httpx.Timeout(None, connect=2.0, write=10.0, pool=10.0)
            transport = httpx.AsyncHTTPTransport(retries=0, socket_options=_SOCKET_OPTIONS)
            client = self.clients[endpoint] = httpx.AsyncClient(base_url=endpoint, timeout=timeout, transport=transport)
        return client

    async def poll_forever(self) -> None:
        while True:
            if self.table:
                with contextlib.suppress(Exception):  # a poll must never end the loop; each host's failure is its own
                    await self.poll()
            self.polled.set()
            await asyncio.sleep(self.poll_seconds)

    async def poll(self) -> None:
        hosts: dict[str, list[Peer]] = {}
        for peers in list(self.table.values()):
            for p in peers:
                hosts.setdefault(p.host, []).append(p)
        await asyncio.gather(*(self._poll_host(peers) for peers in hosts.values()))

    async def _poll_host(self, peers: list[Peer]) -> None:
        try:
            await self._ask_host(peers)
        except Exception as exc:  # noqa: BLE001 - whatever a peer answered, it is not used until it answers well
            why = str(exc) if isinstance(exc, Malformed) else type(exc).__name__  # a field of the wrong type: which one
            for p in peers:
                self._view(p, "refused", f"malformed answer ({why})", "malformed")

    async def _ask_host(self, peers: list[Peer]) -> None:
        host, endpoint = peers[0].host, peers[0].endpoint
        headers = dict((k.decode(), v.decode()) for k, v in self.headers())
        client = self.client(endpoint)
        try:
            health, models = await asyncio.gather(_get(client, "/health", headers), _get(client, "/v1/models", headers))
        except (httpx.HTTPError, OSError) as exc:
            self.up.labels(host).set(0)
            for p in peers:
                self._view(p, "unreachable", type(exc).__name__, "unreachable")
                self.health = self.health.failed(p, time.monotonic())
            return
        self.up.labels(host).set(1)
        if models[0] in (401, 403):
            for p in peers:
                self._view(p, "refused", f"refused our fleet key ({models[0]})", "unauthorized")
            return
        # Not JSON at all is no card (the tenant is not served there); JSON of the wrong shape is Malformed, naming the field.
        cards = validate(ModelList, models[1], "/v1/models").by_id() if models[1] is not None else {}
        tenants = validate(Health, health[1], "/health").tenants if health[1] is not None else {}
        for p in peers:
            card = cards.get(p.tenant)
            state = served_state(p.model, p.digest, card)
            if state == "ok":
                self._view(p, "ok", None, None)
                t = tenants.get(p.tenant)
                self.health = self.health.polled(p, t.running + t.waiting if t is not None else 0)
            else:
                served = _shown(card.x_zoo.model) if card is not None and card.x_zoo is not None else None
                why = f"{state} ({served}; the index pins {p.model})" if state == "wrong version" else state
                self._view(p, "refused", why, state.replace(" ", "_"))

    def watch(self, peer: Peer) -> asyncio.Future[str]:
        """Resolved (with the state) when a poll finds ``peer``'s host unreachable, or the peer refused
        for ``peer.tenant``: its attempts give way. Another tenant's refusal at that host is not this one's."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.watchers.setdefault(peer.key, set()).add(future)
        return future

    def unwatch(self, peer: Peer, future: asyncio.Future[str]) -> None:
        watching = self.watchers.get(peer.key)
        if watching is not None:
            watching.discard(future)
            if not watching:
                del self.watchers[peer.key]

    def _view_of(self, peer: Peer) -> View:
        """The last poll's word on ``peer``, if it was about what this index pins now."""
        view = self.views.get(peer.key)
        return view if view is not None and view.digest == peer.digest else View()

    def _view(self, peer: Peer, state: str, reason: str | None, counted: str | None) -> None:
        old = self.views.get(peer.key)
        if old is None or (old.state, old.reason) != (state, reason):
            if counted is not None:
                self.refusals.labels(peer.host, peer.tenant, counted).inc()
                log.warning("peer %s for %s: %s", peer.host, peer.tenant, reason)
            elif old is not None and old.state != "unknown":
                log.info("peer %s for %s: usable again", peer.host, peer.tenant)
        self.views[peer.key] = View(state, reason, peer.digest)
        self.refused.labels(peer.host, peer.tenant).set(1 if state == "refused" else 0)
        if state != "ok":
            for future in self.watchers.pop(peer.key, set()):
                if not future.done():
                    future.set_result(state + (f" ({reason})" if reason else ""))

    def report(self) -> dict[str, Any]:
        """``/health``'s ``peers``: per host, its worst state over its tenants."""
        now, out = time.monotonic(), dict[str, dict[str, Any]]()
        for peers in self.table.values():
            for p in peers:
                view = self._view_of(p)
                state = "cooling" if view.state == "ok" and self.health.cooling(p, now) else view.state
                entry = out.setdefault(p.host, {"state": "ok", "reason": None, "busy": 0, "tenants": {}})
                entry["tenants"][p.tenant] = state
                entry["busy"] += self.health.busy.get(p.key, 0)
                if _RANK[state] > _RANK[entry["state"]]:
                    entry["state"] = state
                    entry["reason"] = f"cooling down {self.health.cooldown_left(p, now):.0f}s" if state == "cooling" else view.reason
        return out

    def summary(self) -> str:
        """`peers: sprout ok (2 waiting), legion cooling down 20s, thor refused (wrong version ...)`; empty with no peers."""
        parts = []
        for host, entry in self.report().items():
            state = entry["state"]
            if state == "ok":
                parts.append(f"{host} ok" + (f" ({entry['busy']} busy)" if entry["busy"] else ""))
            elif state == "cooling":
                parts.append(f"{host} {entry['reason']}")
            else:
                parts.append(f"{host} {state}" + (f" ({entry['reason']})" if entry["reason"] else ""))
        return "peers: " + ", ".join(parts) if parts else ""

    async def close(self) -> None:
        for client in list(self.clients.values()):
            await client.aclose()


_RANK = {"ok": 0, "unknown": 1, "cooling": 2, "refused": 3, "unreachable": 4}


async def _get(client: httpx.AsyncClient, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    """(status, JSON document or None) of a GET, the body bounded by ``MAX_POLL_BYTES``, within 2 s."""
    async with asyncio.timeout(2.0), client.stream("GET", path, headers=headers) as response:
        data = bytearray()
        try:
            async for chunk in decoded(response):
                data += chunk
                if len(data) > MAX_POLL_BYTES:
                    raise ValueError(f"{path}: larger than {MAX_POLL_BYTES} bytes")
        except Fallback as exc:
            raise ValueError(f"{path}: {exc}") from None
    try:
        return response.status_code, loads(bytes(data))
    except ValueError:  # JSONRefused too: nested 100,000 levels deep is no answer, never a RecursionError
        return response.status_code, None


def _shown(value: Any) -> str | None:
    """A peer's word as we repeat it (log, /health, Status:): a short printable string, or None (issue #31)."""
    return "".join(c if c.isprintable() else "?" for c in value[:100]) if isinstance(value, str) else None

