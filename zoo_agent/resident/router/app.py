"""The router: owns the public socket, forwards each request to its tenant's worker (issue #20).

It reads ``model`` from the body (``tenant``, ``tenant:adapter`` or ``tenant:auto``), takes
a place in that tenant's worker (at most ``max_batch + max_queue`` requests at once, as the
worker itself holds), and streams the worker's answer back unbuffered over the worker's
private unix socket. When the tenant is not loaded (paged out, fetching, loading, restarting)
the request waits in the tenant's queue here, best priority first, while the supervisor
loads it; a streaming client is told so in SSE comment lines. A worker that fails before
its answer started is not the client's failure: the request waits for the restarted worker.

It runs on its own thread and event loop inside the supervisor's process, so a model's
crash, hang or OOM (in its worker) never stops it from answering ``/health``.

That loop also feeds systemd's watchdog, so no request may hold it (issue #31: 52 kB of
newlines through a route held it for tens of seconds). Every place where request or peer
data is worked on in this loop, and its bound in time and memory:

- request line and headers: uvicorn's h11 parser, at most 16 KiB (h11's limit while a head arrives, the
  Gate's ``MAX_HEAD`` once it came: a 431); headers scanned once;
- the body (``wire/gate.py``): read up to ``MAX_BODY`` (1 MiB) into one buffer, a 413 past it; a
  body refused before it ends is read and thrown away, at most 16 MiB and 5 s, no memory kept;
- the parse (``inbound.parse_request``: the bounded JSON reader, depth 64; the session id;
  the query, within the 16 KiB above), the route's features (linear regexes, no backtracking
  across lines; transient memory a few times the message) and the body re-encoded for each
  candidate: linear in the body, so in the loop up to ``INLINE`` (64 KiB: under a
  millisecond), else on two threads (``upstream.bounded``) (at most two such at once: the memory bound;
  a thread still holds the GIL for one C call, a regex over 1 MiB: the loop waits at most
  that, about 0.1 s here; bench/routing.py measures the slowest /health meanwhile);
- embedding a message for a similarity rule: its own one-thread executor (``similarity.py``);
  a route's session file (up to 64 MiB, validated): the default executor;
- answers: a plain tenant's answer passes through chunk by chunk, unparsed; a routed or
  delegated one (``commit.pipe_committed``, ``peer_answer.Events``) is searched for event ends once per chunk (linear),
  holds at most ``MAX_ANSWER`` (16 MiB) before its first token and per event, and each
  event or whole answer is parsed (``jsonbound``) by the same rule as the body (in the loop
  up to 64 KiB, else on those two threads); an error's message is cut to 400 characters;
- peers' ``/health`` (``federation.py``): at most ``MAX_POLL_BYTES`` (4 MiB) each, within 2 s;
- the workers' own ``/metrics`` text (not request data): parsed here, each scrape within 2 s.

The number of open requests is not bounded here (uvicorn's ``limit_concurrency`` is unset):
each holds at most its body (1 MiB), and waits in its tenant's bounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zoo_agent.resident.inbound import EMBED, GENERATE, Host, Parsed, Rejected, alias_tenants, embedding_tenants, parse_request
from zoo_agent.resident.router.admission import Admission, QueueFull, Unavailable
from zoo_agent.resident.router.checkpoints import CheckpointApi, is_checkpoint_path
from zoo_agent.resident.router.delegate import GRANTED, Delegation
from zoo_agent.resident.router.embeddings import forward_embeddings
from zoo_agent.resident.router.endpoints import Endpoints, Metrics
from zoo_agent.resident.router.federation import Federation
from zoo_agent.resident.router.manage import PATHS as MANAGED, Manage
from zoo_agent.resident.router.remote import Remotes
from zoo_agent.resident.router.routes import Routed, Routes
from zoo_agent.resident.router.upstream import HOP, Clients, WorkerFailed, bounded, pipe
from zoo_agent.resident.similarity import Similarity, route_tasks
from zoo_agent.resident.slots import SlotTable
from zoo_agent.resident.wire.gate import PRIVILEGED, Gate
from zoo_agent.resident.wire.headers import PEER, PRIORITY
from zoo_agent.resident.wire.http import MAX_BODY, Receive, Scope, Send, disconnected, error, header, respond, stream_error
from zoo_agent.resident.wire.loop import quiet_cancelled_wakeups
from zoo_agent.resident.wire.priority import CLASSES, BadPriority, PriorityNotAllowed, grant

if TYPE_CHECKING:
    import socket

    from zoo_agent.index.model import Index, RouteEntry
    from zoo_agent.resident.config import ResidentConfig
    from zoo_agent.store.zoo import Zoo

__all__ = ["Keys", "Router"]

log = logging.getLogger("zoo_agent.resident")
_PRIORITY = PRIORITY.lower().encode()


@dataclass(frozen=True)
class Keys:
    """The bearer keys the gate checks (issue #31): clients', peers' (the fleet key), the privileged client's."""

    api: str | None = None
    fleet: str | None = None
    priority: str | None = None


class Router:
    """The ASGI entry: the public socket's requests, each dispatched once parsed (issue #32: it shares
    only the ``SlotTable`` with the supervisor; what it tells the supervisor's metrics goes through
    ``known``, ``loaded``, ``evicted``, ``restarted``, ``fetched``; what it asks, through ``is_ready``
    and ``status_line``)."""

    def __init__(self, table: SlotTable, config: ResidentConfig, zoo: Zoo, host_id: str, keys: Keys, *,
                 is_ready: Callable[[], bool], status_line: Callable[[], str]) -> None:  # fmt: skip
        self.table, self.config, self.zoo, self.keys = table, config, zoo, keys
        self.is_ready, self.status_line = is_ready, status_line
        self.idx: Index | None = None
        self.metrics = Metrics()
        self.admission = Admission(table, config.aging_seconds, config.load_wait)
        self.clients = Clients()
        self.lora_tenant: dict[str, str] = {}  # adapter id -> the tenant declaring it (vLLM's load route names only the adapter)
        self.aliases: dict[str, tuple[str, tuple[str, ...]]] = {}  # a model's alias -> (the model, the tenants serving it here)
        self.routes: dict[str, RouteEntry] = {}  # the host's routes (issue #21): a model name whose rules choose the tenant
        self.embedders: frozenset[str] = frozenset()  # served tenants of kind "embedding" (issue #36)
        self.similarity = Similarity(zoo)  # their similarity rules' embedders (loaded only where a rule needs one)
        self.federation = Federation(host_id, keys.fleet, self.metrics.registry, config.peer_poll_seconds)  # the peers (issue #22)
        self.delegation = Delegation(self.federation, config.load_wait, lambda: self.idx)
        own = frozenset(k for k in (keys.api, keys.fleet, keys.priority) if k)  # never a remote tenant's key
        self.remotes = Remotes(table, self.admission, self.metrics.registry, own, config.aging_seconds, config.load_wait,
                               lambda tenant, code: self.metrics.requests.labels(tenant, str(code)).inc())  # remote tenants (issue #36)
        self.route = Routes(table, self.admission, self.delegation, self.federation, self.clients, self.similarity, self.metrics, zoo, config.load_wait,
                            self.remotes)  # fmt: skip
        self.endpoints = Endpoints(table, self.metrics, self.admission, self.federation, self.clients, is_ready=is_ready, status_line=status_line,
                                   index=lambda: self.idx, routes=lambda: self.routes, zoo=zoo, remotes=self.remotes)  # fmt: skip
        self.manage = Manage(table, config.load_wait)  # POST /models/load|unload (issue #34)
        self.checkpoints = CheckpointApi(zoo, lambda: self.idx, lambda: self.table.order, lambda: self.routes)  # issue #36
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.server: Any = None
        self.beat = time.monotonic()

    # -- the supervisor's thread ------------------------------------------------------------
    def take_index(self, idx: Index, host_id: str) -> None:
        """The index the supervisor took (its slot table already follows it), with this host's id in it."""
        lora_tenant: dict[str, str] = {}
        for tid in self.table.order:
            for lid in idx.tenants[tid].loras:
                lora_tenant.setdefault(lid, tid)
        self.lora_tenant = lora_tenant
        self.aliases = alias_tenants(idx, self.table.order)
        self.embedders = embedding_tenants(idx, self.table.order)
        self.routes = {rid: idx.routes[rid] for rid in idx.hosts[host_id].routes if rid in idx.routes}
        self.similarity.take(route_tasks(self.zoo, idx, host_id))
        self.federation.take_index(idx, host_id)
        self.remotes.take_index(idx, self.table.order)
        self.idx = idx

    def start(self, listener: socket.socket, private: socket.socket | None = None) -> None:
        """Serve the public socket, and ``private`` (a unix socket in the supervisor's own
        directory) where workers ask other tenants, as the route's summarizer (issue #21)."""
        import uvicorn

        app = Gate(self, max_body=MAX_BODY, api_key=self.keys.api, fleet_key=self.keys.fleet, priority_key=self.keys.priority)
        # proxy_headers off: no X-Forwarded-* rewriting of a request's client (nothing here reads it), one step less a request.
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=int(self.config.drain_seconds) + 1,
                                lifespan="off", proxy_headers=False)  # fmt: skip
        self.server = uvicorn.Server(config)
        ready = threading.Event()

        def run() -> None:
            async def main() -> None:
                self.loop = asyncio.get_running_loop()
                quiet_cancelled_wakeups(self.loop)
                heart = asyncio.create_task(self._heartbeat())
                polling = asyncio.create_task(self.federation.poll_forever())
                remotes = asyncio.create_task(self.remotes.poll_forever())
                ready.set()
                await self.server.serve(sockets=[listener, *([private] if private is not None else [])])
                heart.cancel()
                polling.cancel()
                remotes.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await polling  # no poll in flight on a client being closed
                with contextlib.suppress(asyncio.CancelledError):
                    await remotes
                await self.clients.close()
                await self.federation.close()
                await self.remotes.close()

            asyncio.run(main())

        self.thread = threading.Thread(target=run, name="router", daemon=True)
        self.thread.start()
        ready.wait(10)

    def alive(self, seconds: float) -> bool:
        """The router's loop turned within ``seconds`` (what the watchdog may vouch for)."""
        return self.thread is not None and self.thread.is_alive() and time.monotonic() - self.beat < seconds

    def poke(self, tenant: str) -> None:
        """A tenant's state changed (loaded, refused, failed): serve or answer who waits for it."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.admission.pump, tenant)

    def forget(self, path: str) -> None:
        """A worker is gone: close the connections to its socket."""
        self.clients.forget(path, self.loop)

    def known(self, tenant: str, on_demand: bool) -> None:
        self.metrics.known(tenant, on_demand)

    def restarted(self, tenant: str, reason: str) -> None:
        self.metrics.restarts.labels(tenant, reason).inc()

    def fetched(self, tenant: str, result: str) -> None:
        self.metrics.fetches.labels(tenant, result).inc()

    def loaded(self, tenant: str, seconds: float) -> None:
        self.metrics.load_seconds.labels(tenant).observe(seconds)

    def evicted(self, tenant: str, reason: str) -> None:
        self.metrics.evictions.labels(tenant, reason).inc()

    def stop(self) -> None:
        """Stop accepting; requests in flight finish (uvicorn's graceful shutdown)."""
        self.admission.stopping = True
        if self.server is not None:
            self.server.should_exit = True
        for tenant in self.admission.waiting():
            self.poke(tenant)  # who waits for a tenant to load is answered now: nothing loads any more
        self.similarity.close()

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    # -- the router's loop -------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        while True:
            self.beat = time.monotonic()
            await asyncio.sleep(0.25)


    # -- ASGI ----------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await _whole_body(receive)
        if body is None:
            return  # the client left before its body arrived
        if await self._own(scope, body, send):
            return
        named = [v for k, v in scope.get("headers", []) if k.lower() == _PRIORITY]
        parse = functools.partial(parse_request, scope["method"], scope["path"], scope.get("query_string", b""), body, self._host(),
                                  content_type=header(scope, "content-type"), from_peer=header(scope, PEER) is not None, priority=named)  # fmt: skip
        parsed = await bounded(len(body), parse)  # linear in the body: a large one is parsed off the loop
        if isinstance(parsed, Rejected):
            await respond(send, *error(parsed.status, parsed.message, param=parsed.param, code=parsed.code))
            return
        await self._dispatch(scope, receive, send, body, parsed)

    async def _own(self, scope: Scope, body: bytes, send: Send) -> bool:
        """What the router answers itself (``/health``, ``/metrics``, ``/v1/models``, the managed paths, the
        zoo's checkpoint files): True when it did."""
        method, path = scope["method"], scope["path"]
        if method == "GET" and path == "/health":
            status, data = self.endpoints.health()
            await respond(send, status, data)
        elif method == "GET" and path == "/metrics":
            text = await self.endpoints.metrics()
            await respond(send, 200, text, [(b"content-type", b"text/plain; version=0.0.4")])
        elif method == "GET" and path == "/v1/models":
            await respond(send, 200, json.dumps({"object": "list", "data": self.endpoints.models()}).encode())
        elif path in MANAGED:
            await self.manage(scope, body, send)
        elif is_checkpoint_path(path):  # the zoo's files, no worker (issue #36): on a thread, as a route's session
            files = functools.partial(self.checkpoints.answer, method, path, scope.get("query_string", b""), body,
                                      content_type=header(scope, "content-type"), from_peer=header(scope, PEER) is not None)  # fmt: skip
            await respond(send, *await asyncio.get_running_loop().run_in_executor(None, files))
        else:
            return False
        return True

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send, body: bytes, parsed: Parsed) -> None:
        """A parsed request to where it goes: an embedding tenant, a route's session, a route's candidates, the tenant's
        peers, or its worker."""
        tenant, generate = parsed.tenant, scope["path"] in GENERATE
        body = body if parsed.body is None else parsed.body  # an alias: the tenant's name in the body
        if scope["path"] == EMBED:  # an embedding tenant's request (issue #36): router/embeddings.py
            await forward_embeddings(self, scope, receive, send, body, parsed)
            return
        if parsed.session is not None and tenant in self.routes:
            # Reading (up to 64 MiB, validated) is no work for the loop that streams every answer.
            answer = await asyncio.get_running_loop().run_in_executor(None, self.route.session, tenant, parsed.session, scope["method"])
            await respond(send, *answer)
            return
        route = self.routes.get(tenant) if generate else None
        routed = await self.route.choose(tenant, route, parsed.document, len(body)) if route is not None else None
        if routed is not None:
            tenant = routed.tenants[0] if routed.tenants else routed.chosen
        priority = self._default_priority(tenant)
        if generate:
            try:
                priority = self._grant(scope, parsed, priority, routed)
            except BadPriority as exc:
                await respond(send, *error(403 if isinstance(exc, PriorityNotAllowed) else 400, str(exc), param=exc.param,
                                           code="priority_not_allowed" if isinstance(exc, PriorityNotAllowed) else None))  # fmt: skip
                return
        if routed is not None:
            await self.route.forward(scope, receive, send, routed, priority, parsed.stream)
        elif generate and tenant not in self.table.slots:  # served by peers only (parse_request checked)
            await self.delegation.forward_peers(scope, receive, send, body, tenant, parsed.stream, session=parsed.in_session, model=parsed.document.get("model"))
        elif tenant in self.remotes:  # a server elsewhere answers it (issue #36)
            await self.remotes.forward(scope, receive, send, parsed, priority, len(body))
        else:
            await self._forward(scope, receive, send, body, tenant, priority, parsed.stream, session=parsed.in_session)

    def _grant(self, scope: Scope, parsed: Parsed, default: int, routed: Routed | None) -> int:
        """The request's priority: above default only with the priority key (issue #31; a peer's request
        is a client's). A route's request may be answered by any of its candidates: it may name no
        better than the worst one's own class. ``BadPriority`` when it asks for what it may not have."""
        own = max(self._default_priority(t) for t in routed.tenants) if routed is not None and routed.tenants else default
        priority = grant(parsed.priority_header, parsed.priority_field, default, scope.get(PRIVILEGED) is True, own)
        named = parsed.priority_header is not None or parsed.priority_field is not None
        scope[GRANTED] = priority if named else None  # what a peer is asked for: for_peer
        return priority

    def _host(self) -> Host:
        """What ``parse_request`` needs to know of this host: its own dicts, which ``take_index`` replaces whole."""
        fed = self.federation
        return Host(self.table.order, self.routes, fed.accepts, lambda tenant: bool(fed.peers_of(tenant)), self.lora_tenant, self.aliases,
                    self.embedders)


    def _may_overflow(self, scope: Scope, tenant: str) -> bool:
        """A tenant declared ``overflow: "peers"`` with peers, for a request that did not come from one."""
        idx = self.idx
        return (idx is not None and tenant in idx.tenants and idx.tenants[tenant].overflow == "peers" and bool(self.federation.peers_of(tenant))
                and header(scope, PEER) is None)  # fmt: skip

    def _overflows(self, scope: Scope, tenant: str) -> str | None:
        """Why a request goes to peers before it waits here: its tenant's queue is full, or it does not fit now."""
        if scope["path"] not in GENERATE or not self._may_overflow(scope, tenant):
            return None
        return self.admission.overflows(tenant)

    def _default_priority(self, tenant: str) -> int:
        """The tenant's own class: its slot's here, the index's for a tenant only peers serve."""
        slot, idx = self.table.slots.get(tenant), self.idx
        if slot is None and idx is not None and tenant in idx.tenants:
            return CLASSES[idx.tenants[tenant].priority]
        return slot.priority if slot is not None else 0

    async def _forward(self, scope: Scope, receive: Receive, send: Send, body: bytes, tenant: str, priority: int, stream: bool,
                       session: bool = False) -> None:  # fmt: skip
        """Wait for a place, send the request, stream the answer back; a worker that fails before
        answering gets the request again once it is back (bounded), never a second model."""
        head = _Head(send)
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in HOP]
        target = scope["path"] + (("?" + scope["query_string"].decode("latin-1")) if scope.get("query_string") else "")
        gone = asyncio.ensure_future(disconnected(receive))
        code = 0
        try:
            for attempt in range(3):
                if not head.started and (why := self._overflows(scope, tenant)) is not None:
                    await self.delegation.forward_peers(scope, receive, send, body, tenant, stream, why, session)
                    return  # counted per peer
                try:
                    path = await self.admission.take(tenant, priority, gone, head.comment if stream else None)
                except (Unavailable, QueueFull, TimeoutError) as exc:
                    code = await self._unplaced(scope, receive, send, body, tenant, stream, session, exc, head.started)
                    return
                if path is None:
                    return  # the client left while it waited
                try:
                    code = await pipe(self.clients.to(path), scope["method"], target, headers, body, send, gone, head.started)
                except WorkerFailed as exc:
                    self.metrics.retries.labels(tenant).inc()
                    log.warning("%s: the worker failed before answering (%s); sending the request again (%d)", tenant, exc, attempt + 1)
                    await asyncio.sleep(0.2)
                    continue
                finally:
                    self.admission.release(tenant)
                return
            code = 503
            await _refuse(send, head.started, 503, f"tenant '{tenant}': its worker failed three times before answering")
        finally:
            gone.cancel()
            if code:
                self.metrics.requests.labels(tenant, str(code)).inc()

    async def _unplaced(self, scope: Scope, receive: Receive, send: Send, body: bytes, tenant: str, stream: bool, session: bool,
                        exc: Exception, started: bool) -> int:  # fmt: skip
        """No place: the tenant's peers take it when it may overflow, else a 429 or 503. The status to count (0: counted per peer)."""
        status = 429 if isinstance(exc, QueueFull) else 503
        message = str(exc) or f"tenant '{tenant}' did not load within {self.config.load_wait:.0f}s"
        if not started and scope["path"] in GENERATE and self._may_overflow(scope, tenant):
            await self.delegation.forward_peers(scope, receive, send, body, tenant, stream, message, session)
            return 0
        await _refuse(send, started, status, message)
        return status


class _Head:
    """Our answer's head, sent with the first SSE comment of a streaming client that waits for its tenant."""

    def __init__(self, send: Send) -> None:
        self.send, self.started = send, False

    async def comment(self, text: str) -> None:
        if not self.started:
            await self.send({"type": "http.response.start", "status": 200,
                             "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})  # fmt: skip
            self.started = True
        await self.send({"type": "http.response.body", "body": f": {text}\n\n".encode(), "more_body": True})


async def _refuse(send: Send, started: bool, status: int, message: str) -> None:
    """A 429 (the queue is full) or 503 (no worker): the stream's last event once our head is out, else a whole answer."""
    if started:
        await stream_error(send, status, message)
    else:
        await respond(send, *error(status, message, code="model_unavailable" if status == 503 else "queue_full"),
                      headers=[(b"retry-after", b"1" if status == 429 else b"5")])  # fmt: skip


async def _whole_body(receive: Receive) -> bytes | None:
    """The request's body (the Gate read and limited it already: one message), or None when the client left."""
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += bytes(message.get("body", b""))
        if not message.get("more_body", False):
            return body
