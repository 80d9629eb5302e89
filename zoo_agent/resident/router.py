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

- request line and headers: uvicorn's h11 parser, at most 16 KiB; headers scanned once;
- the body (``gate.py``): read up to ``MAX_BODY`` (1 MiB) into one buffer, a 413 past it; a
  body refused before it ends is read and thrown away, at most 16 MiB and 5 s, no memory kept;
- the parse (``inbound.parse_request``: the bounded JSON reader, depth 64; the session id;
  the query, within the 16 KiB above), the route's features (linear regexes, no backtracking
  across lines; transient memory a few times the message) and the body re-encoded for each
  candidate: linear in the body, so in the loop up to ``INLINE`` (64 KiB: under a
  millisecond), else on ``_WORK``'s two threads (at most two such at once: the memory bound;
  a thread still holds the GIL for one C call, a regex over 1 MiB: the loop waits at most
  that, about 0.1 s here; bench/routing.py measures the slowest /health meanwhile);
- embedding a message for a similarity rule: its own one-thread executor (``similarity.py``);
  a route's session file (up to 64 MiB, validated): the default executor;
- answers: a plain tenant's answer passes through chunk by chunk, unparsed; a routed or
  delegated one (``_pipe_committed``) is searched for event ends once per chunk (linear),
  holds at most ``MAX_ANSWER`` (16 MiB) before its first token and per event, and each
  event or whole answer is parsed (``jsonbound``) by the same rule as the body (in the loop
  up to 64 KiB, else on ``_WORK``); an error's message is cut to 400 characters;
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
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from zoo_agent.resident.federation import PEER_HEADER, Federation
from zoo_agent.jsonbound import loads
from zoo_agent.resident.gate import PRIVILEGED, Gate
from zoo_agent.resident.inbound import GENERATE, Host, Rejected, parse_request
from zoo_agent.resident.peer_answer import MAX_ERROR, Events, Refused, error_message, head, judge, whole
from zoo_agent.resident.peers import Peer, pinned, tenant_digest, undeclared
from zoo_agent.resident.priority import CLASSES, HEADER, BadPriority, PriorityNotAllowed, PriorityQueue, for_peer, grant
from zoo_agent.resident.routing import Features, candidates, choose, features, last_user_text, needs_similarity
from zoo_agent.resident.sessions.store import ROUTE_HEADER, remove_session, session_lock
from zoo_agent.resident.similarity import Similarity, route_tasks
from zoo_agent.resident.sessions.transcript import SessionDamaged, SessionError, read_session, valid_id

if TYPE_CHECKING:
    import socket

    from zoo_agent.index.model import Index, RouteEntry
    from zoo_agent.resident.supervisor import Supervisor

__all__ = ["Router"]

log = logging.getLogger("zoo_agent.resident")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY = 1 << 20
#: The most a worker's or a peer's answer (or one of its events) may be; ours are far smaller.
MAX_ANSWER = 16 << 20
#: Request headers that describe this hop, not the request (RFC 9110 §7.6.1), the client's
#: credential (the router checked it; workers, on private sockets, never see it), and the
#: header only the router may set.
HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"proxy-authorization", b"proxy-connection",
                 b"host", b"content-length", b"authorization", b"expect", ROUTE_HEADER.lower().encode(), PEER_HEADER.lower().encode()})  # fmt: skip
#: The request headers a delegated request keeps (with the fleet key, X-Zoo-Peer and the priority for_peer added).
TO_PEERS = frozenset({b"content-type", b"accept", b"user-agent"})
#: The scope key for a request's granted priority, when it named one (what for_peer asks a peer for).
GRANTED = "zoo.priority"
HOP_BACK = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"server", b"date"})
#: Request or answer data up to this size is worked on in the router's loop (parsing 64 kB of
#: JSON or running the route's rules over it takes well under a millisecond); more, on ``_WORK``.
INLINE = 64 << 10
#: Two threads for larger bodies, answers and events: at most two such parses at once (the memory
#: bound, a few times 16 MiB at most), and the loop, which feeds the watchdog, never waits for one.
_WORK = ThreadPoolExecutor(max_workers=2, thread_name_prefix="router-work")
T = TypeVar("T")
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.loaded = Gauge("zoo:model_loaded", "1 while the tenant's model is loaded and serving.", ["tenant"], registry=r)
        self.load_seconds = Histogram("zoo:model_load_seconds", "Seconds from spawning a tenant's worker to its first real generation.",
                                      ["tenant"], registry=r, buckets=LATENCY_BUCKETS)  # fmt: skip
        self.evictions = Counter("zoo:model_evictions", "Tenants paged out, by reason (budget: to make room).", ["tenant", "reason"], registry=r)
        self.footprint = Gauge("zoo:model_footprint_bytes", "Memory the budget counts for the tenant (the larger of estimate and measurement).",
                               ["tenant"], registry=r)  # fmt: skip
        self.budget = Gauge("zoo:memory_budget_bytes", "The host's memory budget (absent: none).", registry=r)
        self.waiting = Gauge("zoo:router_requests_waiting", "Requests waiting in the router for their tenant to load, by priority class.",
                             ["tenant", "priority"], registry=r)  # fmt: skip
        self.inflight = Gauge("zoo:router_requests_inflight", "Requests forwarded to the tenant's worker and not finished.", ["tenant"], registry=r)
        self.requests = Counter("zoo:router_requests", "Requests the router answered, by tenant and status code.", ["tenant", "code"], registry=r)
        self.retries = Counter("zoo:router_retries", "Requests sent again after their worker failed before answering.", ["tenant"], registry=r)
        self.restarts = Counter("zoo:worker_restarts", "Workers the supervisor replaced, by why (crash: it exited; hang: it stopped answering pings).",
                                ["tenant", "reason"], registry=r)  # fmt: skip
        self.ready = Gauge("zoo:resident_ready", "1 once every pinned tenant (or the first listed) answered a real generation.", registry=r)
        self.started = Gauge("zoo:resident_start_time_seconds", "When this resident started (Unix time).", registry=r)
        self.started.set(time.time())
        self.routed = Counter("zoo:route_requests", "Requests for a route, by the rule that chose and the tenant that answered.",
                              ["route", "rule", "tenant"], registry=r)  # fmt: skip
        self.fallbacks = Counter("zoo:route_fallbacks", "Requests that went to the next candidate before their first token, by why.",
                                 ["route", "tenant", "reason"], registry=r)  # fmt: skip
        self.fetches = Counter("zoo:on_demand_fetches", "Fetches on first use of an on-demand tenant, by result (ok, failed).",
                               ["tenant", "result"], registry=r)  # fmt: skip

    def known(self, tenant: str, on_demand: bool = False) -> None:
        """A tenant's label sets, at zero, from the moment it is known: ``increase()`` and
        ``rate()`` see its first restart, load or fetch instead of a series born at 1."""
        self.load_seconds.labels(tenant)
        self.retries.labels(tenant)
        self.evictions.labels(tenant, "budget")
        for reason in ("crash", "hang"):
            self.restarts.labels(tenant, reason)
        if on_demand:
            for result in ("ok", "failed"):
                self.fetches.labels(tenant, result)


class _Waiter:
    """A request waiting for a place in its tenant's worker."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[str] = loop.create_future()


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> tuple[int, bytes]:
    kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
    return status, json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]})  # fmt: skip
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope: Scope, name: str) -> str | None:
    wanted = name.lower().encode()
    value = next((v for k, v in scope.get("headers", []) if k.lower() == wanted), None)
    return value.decode("latin-1") if value is not None else None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _bounded(size: int, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)``, whose cost is linear in ``size`` bytes of someone else's data: in the loop
    when that is at most ``INLINE``, else on ``_WORK`` (the loop answers /health meanwhile)."""
    if size <= INLINE:
        return work(*args)
    return await asyncio.get_running_loop().run_in_executor(_WORK, functools.partial(work, *args))


def _features(route: RouteEntry, document: dict[str, Any]) -> tuple[Features, str | None]:
    """The request's features for the route's rules, and its message when a similarity rule would be tried (to embed)."""
    f = features(document)
    if needs_similarity(route, f) and (text := last_user_text(document)).strip():
        return f, text
    return f, None


def _with_model(document: dict[str, Any], tenant: str) -> bytes:
    """The body for one candidate. ``ValueError`` for a number JSON cannot hold (``1e999`` reads as
    infinity, which would go out as ``Infinity``: the worker then refused a body the client never sent)."""
    return json.dumps({**document, "model": tenant}, allow_nan=False).encode()


class Router:
    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor
        self.metrics = _Metrics()
        self.queues: dict[str, PriorityQueue[_Waiter]] = {}
        self.clients: dict[str, httpx.AsyncClient] = {}
        self.models: list[dict[str, Any]] = []
        self.lora_tenant: dict[str, str] = {}  # adapter id -> the tenant declaring it (vLLM's load route names only the adapter)
        self.routes: dict[str, RouteEntry] = {}  # the host's routes (issue #21): a model name whose rules choose the tenant
        self.similarity = Similarity(supervisor.zoo)  # their similarity rules' embedders (loaded only where a rule needs one)
        self.federation = Federation(supervisor.host_id, supervisor.fleet_key, self.metrics.registry,
                                     supervisor.config.peer_poll_seconds)  # the peers (issue #22)  # fmt: skip
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.server: Any = None
        self.beat = time.monotonic()
        self.stopping = False

    # -- the supervisor's thread ------------------------------------------------------------
    def take_index(self, idx: Index) -> None:
        lora_tenant: dict[str, str] = {}
        for tid in self.sup.order:
            for lid in idx.tenants[tid].loras:
                lora_tenant.setdefault(lid, tid)
        self.lora_tenant = lora_tenant
        host_id = self.sup.host_id
        self.routes = {rid: idx.routes[rid] for rid in idx.hosts[host_id].routes if rid in idx.routes}
        self.similarity.take(route_tasks(self.sup.zoo, idx, host_id))
        self.federation.take_index(idx, host_id)

    def start(self, listener: socket.socket, private: socket.socket | None = None) -> None:
        """Serve the public socket, and ``private`` (a unix socket in the supervisor's own
        directory) where workers ask other tenants, as the route's summarizer (issue #21)."""
        import uvicorn

        app = Gate(self, max_body=MAX_BODY, api_key=self.sup.api_key, fleet_key=self.sup.fleet_key, priority_key=self.sup.priority_key)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=int(self.sup.config.drain_seconds) + 1,
                                lifespan="off")  # fmt: skip
        self.server = uvicorn.Server(config)
        ready = threading.Event()

        def run() -> None:
            async def main() -> None:
                self.loop = asyncio.get_running_loop()
                heart = asyncio.create_task(self._heartbeat())
                polling = asyncio.create_task(self.federation.poll_forever())
                ready.set()
                await self.server.serve(sockets=[listener, *([private] if private is not None else [])])
                heart.cancel()
                polling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await polling  # no poll in flight on a client being closed
                for client in list(self.clients.values()):
                    await client.aclose()
                await self.federation.close()

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
            self.loop.call_soon_threadsafe(self._pump, tenant)

    def forget(self, path: str) -> None:
        """A worker is gone: close the connections to its socket."""
        client = self.clients.pop(path, None)
        if client is not None and self.loop is not None:
            asyncio.run_coroutine_threadsafe(client.aclose(), self.loop)

    def loaded(self, tenant: str, seconds: float) -> None:
        self.metrics.load_seconds.labels(tenant).observe(seconds)

    def evicted(self, tenant: str, reason: str) -> None:
        self.metrics.evictions.labels(tenant, reason).inc()

    def stop(self) -> None:
        """Stop accepting; requests in flight finish (uvicorn's graceful shutdown)."""
        self.stopping = True
        if self.server is not None:
            self.server.should_exit = True
        for tenant in list(self.queues):
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

    def _pump(self, tenant: str) -> None:
        """Give free places in the tenant's worker to its best waiters; answer them all if it is refused."""
        queue = self.queues.get(tenant)
        if not queue:
            return
        with self.sup.lock:
            slot = self.sup.slots.get(tenant)
            while len(queue):
                if slot is None or slot.refusal is not None or self.stopping:
                    waiter = queue.pop_best()
                    if not waiter.future.done():
                        why = "the resident is stopping" if self.stopping else slot.refusal if slot else f"tenant '{tenant}' is no longer served here"
                        waiter.future.set_exception(_Refused(why))
                    continue
                if slot.path is None or slot.inflight >= slot.capacity:
                    break
                waiter = queue.pop_best()
                if waiter.future.done():  # its client left
                    continue
                slot.inflight += 1
                slot.last_used = time.monotonic()
                waiter.future.set_result(slot.path)
            if slot is not None:
                slot.queued = len(queue)
                slot.wanted = slot.wanted or bool(len(queue))

    async def _place(self, tenant: str, priority: int) -> str:
        """A place in the tenant's worker: its socket path (release it with ``_release``)."""
        loop = asyncio.get_running_loop()
        queue = self.queues.setdefault(tenant, PriorityQueue(self.sup.config.aging_seconds))
        with self.sup.lock:
            slot = self.sup.slots.get(tenant)
            if slot is None:
                raise _Refused(f"tenant '{tenant}' is not served by this host")
            if slot.path is not None and not len(queue):
                if slot.inflight >= slot.capacity:
                    raise _Full(f"tenant '{tenant}' is at capacity ({slot.capacity} requests running and waiting); retry later")
                slot.inflight += 1
                slot.last_used = time.monotonic()
                return slot.path
            if len(queue) >= slot.capacity:
                raise _Full(f"tenant '{tenant}' is {slot.phase.replace('_', ' ')} and {len(queue)} requests already wait for it; retry later")
            if slot.phase == "failed" and slot.refusal is not None:
                slot.refusal = None  # a new request tries a failed tenant again
            if slot.refusal is not None:
                raise _Refused(slot.refusal)
            if self.stopping:
                raise _Refused("the resident is stopping")
            waiter = _Waiter(loop)
            queue.push(waiter, priority, time.monotonic())
            slot.queued, slot.wanted, slot.last_used = len(queue), True, time.monotonic()
        self.sup.wake()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            placed = False
            with self.sup.lock:
                future = waiter.future
                if future.done() and not future.cancelled() and future.exception() is None:
                    placed = True  # given a place just as its client left: give it back
                else:
                    future.cancel()
                    queue.remove(waiter)
                    slot.queued = len(queue)
            if placed:
                self._release(tenant)
            raise

    def _release(self, tenant: str) -> None:
        with self.sup.lock:
            slot = self.sup.slots.get(tenant)
            if slot is not None:
                slot.inflight = max(0, slot.inflight - 1)
                slot.last_used = time.monotonic()
        self._pump(tenant)

    def _client(self, path: str) -> httpx.AsyncClient:
        client = self.clients.get(path)
        if client is None:
            transport = httpx.AsyncHTTPTransport(uds=path, retries=0)
            client = self.clients[path] = httpx.AsyncClient(transport=transport, base_url="http://worker", timeout=httpx.Timeout(None, connect=5.0))
        return client

    # -- ASGI ----------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:  # the Gate already read and limited it: one message
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        method, path = scope["method"], scope["path"]
        if path == "/health" and method == "GET":
            status, data = self._health()
            await _respond(send, status, data)
            return
        if path == "/metrics" and method == "GET":
            text = await self._metrics()
            await _respond(send, 200, text, [(b"content-type", b"text/plain; version=0.0.4")])
            return
        if path == "/v1/models" and method == "GET":
            await _respond(send, 200, json.dumps({"object": "list", "data": self._models()}).encode())
            return
        from_peer = _header(scope, PEER_HEADER)
        parse = functools.partial(parse_request, method, path, scope.get("query_string", b""), body, self._host(),
                                  content_type=_header(scope, "content-type"), from_peer=from_peer is not None)  # fmt: skip
        parsed = await _bounded(len(body), parse)  # linear in the body: a large one is parsed off the loop
        if isinstance(parsed, Rejected):
            await _respond(send, *_error(parsed.status, parsed.message, param=parsed.param, code=parsed.code))
            return
        tenant, document = parsed.tenant, parsed.document
        if parsed.session is not None and tenant in self.routes:
            # Reading (up to 64 MiB, validated) is no work for the loop that streams every answer.
            answer = await asyncio.get_running_loop().run_in_executor(None, self._route_session, tenant, parsed.session, method)
            await _respond(send, *answer)
            return
        route = self.routes.get(tenant) if path in GENERATE else None
        if route is not None:
            routed = await self._choose(tenant, route, document, len(body))
            tenant = routed.tenants[0] if routed.tenants else routed.chosen
        stream, priority = False, self._default_priority(tenant)
        if path in GENERATE and method == "POST":
            stream = document.get("stream") is True
            field = document.get("priority")
            named = [v for k, v in scope.get("headers", []) if k.lower() == HEADER.lower().encode()]
            if len(named) > 1:  # the router would check one and the worker serve another
                await _respond(send, *_error(400, f"{HEADER}: sent {len(named)} times; send it once", param=HEADER))
                return
            header = named[0] if named else None
            # A field of the wrong type is the worker's 400 to give, with the rest of the body's checks.
            field = field if isinstance(field, int) and not isinstance(field, bool) else None
            # A route's request may be answered by any of its candidates: it may name no better than the worst one's own class.
            own = max(self._default_priority(t) for t in routed.tenants) if route is not None and routed.tenants else priority
            try:  # above default only with the priority key (issue #31); a peer's request is a client's
                priority = grant(header.decode("latin-1") if header is not None else None, field, priority, scope.get(PRIVILEGED) is True, own)
            except BadPriority as exc:
                await _respond(send, *_error(403 if isinstance(exc, PriorityNotAllowed) else 400, str(exc), param=exc.param,
                                             code="priority_not_allowed" if isinstance(exc, PriorityNotAllowed) else None))  # fmt: skip
                return
            scope[GRANTED] = priority if header is not None or field is not None else None  # what a peer is asked for: for_peer
        if tenant not in self.sup.slots and route is None and path in GENERATE:  # served by peers only (parse_request checked)
            await self._forward_peers(scope, receive, send, body, tenant, document.get("stream") is True, session=document.get("session") is not None,
                                      model=document.get("model"))  # fmt: skip
            return
        if route is not None:
            await self._forward_routed(scope, receive, send, routed, priority, stream)
            return
        await self._forward(scope, receive, send, body, tenant, priority, stream, session=document.get("session") is not None)

    async def _choose(self, rid: str, route: RouteEntry, document: dict[str, Any], size: int) -> _Routed:
        """The route's decision; the message is embedded only when a similarity rule would be tried.
        The features are linear in the message, ``size`` bytes of body: a large one is read off the loop."""
        f, text = await _bounded(size, _features, route, document)
        why = None
        if text is not None:
            scores, why = await self.similarity.scores(rid, text)
            f = replace(f, similarity=scores)
        choice = choose(route, f)
        tried = [t for t in candidates(route, choice.tenant) if t in self.sup.slots or self.federation.peers_of(t)]  # here, or at a peer
        return _Routed(rid, route, choice.rule, tried, document, chosen=choice.tenant, similarity=choice.similarity, similarity_unavailable=why,
                       size=size)  # fmt: skip

    def _host(self) -> Host:
        """What ``parse_request`` needs to know of this host: its own dicts, which ``take_index`` replaces whole."""
        fed = self.federation
        return Host(self.sup.order, self.routes, fed.accepts, lambda tenant: bool(fed.peers_of(tenant)), self.lora_tenant)

    def _route_session(self, route: str, sid: str, method: str) -> tuple[int, bytes]:
        """GET or DELETE a route's session. Its transcript is a file any of the route's workers
        may write (under their lock, by rename): reading it here needs no worker loaded."""
        sessions = self.sup.zoo.route_dir(route) / "sessions"
        try:
            path = sessions / f"{valid_id(sid)}.json"
        except SessionError as exc:
            return _error(400, str(exc), param="session")
        if method == "DELETE":
            with session_lock(sessions):  # a commit under way finishes first, or sees no session
                found = remove_session(sessions.parent, sid)
            if not found:
                return _error(404, f"session '{sid}' does not exist (route '{route}')", param="session", code="session_not_found")
            return 200, json.dumps({"id": sid, "object": "session.deleted", "deleted": True}).encode()
        if method != "GET":
            return _error(405, "Method Not Allowed")
        try:
            transcript = read_session(path)
        except FileNotFoundError:
            return _error(404, f"session '{sid}' does not exist (route '{route}')", param="session", code="session_not_found")
        except SessionDamaged as exc:
            return _error(422, f"session '{sid}' is damaged ({exc}); delete it (DELETE /v1/sessions/{sid}?model={route})", param="session",
                          code="session_damaged")  # fmt: skip
        return 200, json.dumps(transcript.document()).encode()

    def _may_overflow(self, scope: Scope, tenant: str) -> bool:
        """A tenant declared ``overflow: "peers"`` with peers, for a request that did not come from one."""
        idx = self.sup.idx
        return (idx is not None and tenant in idx.tenants and idx.tenants[tenant].overflow == "peers" and bool(self.federation.peers_of(tenant))
                and _header(scope, PEER_HEADER) is None)  # fmt: skip

    def _overflows(self, scope: Scope, tenant: str) -> str | None:
        """Why a request goes to peers before it waits here: its tenant's queue is full, or it does not fit now."""
        if scope["path"] not in GENERATE or not self._may_overflow(scope, tenant):
            return None
        with self.sup.lock:
            slot = self.sup.slots.get(tenant)
            if slot is None:
                return None
            if slot.path is not None and slot.inflight >= slot.capacity:
                return f"at capacity ({slot.capacity} running and waiting)"
            if slot.path is None and slot.blocked:
                return f"does not fit now ({slot.blocked})"
        return None

    def _default_priority(self, tenant: str) -> int:
        """The tenant's own class: its slot's here, the index's for a tenant only peers serve."""
        slot, idx = self.sup.slots.get(tenant), self.sup.idx
        if slot is None and idx is not None and tenant in idx.tenants:
            return CLASSES[idx.tenants[tenant].priority]
        return slot.priority if slot is not None else 0

    async def _forward(self, scope: Scope, receive: Receive, send: Send, body: bytes, tenant: str, priority: int, stream: bool,
                       session: bool = False) -> None:  # fmt: skip
        """Wait for a place, send the request, stream the answer back; a worker that fails before
        answering gets the request again once it is back (bounded), never a second model."""
        started = False  # our response's head is out

        async def comment(text: str) -> None:
            nonlocal started
            if not started:
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})  # fmt: skip
                started = True
            await send({"type": "http.response.body", "body": f": {text}\n\n".encode(), "more_body": True})

        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in HOP]
        target = scope["path"] + (("?" + scope["query_string"].decode("latin-1")) if scope.get("query_string") else "")
        gone = asyncio.ensure_future(_disconnected(receive))
        code = 0
        try:
            for attempt in range(3):
                if not started and (why := self._overflows(scope, tenant)) is not None:
                    code = 0  # counted per peer
                    await self._forward_peers(scope, receive, send, body, tenant, stream, why, session)
                    return
                placing = asyncio.ensure_future(self._place(tenant, priority))
                try:
                    path = await self._wait(placing, gone, tenant, comment if stream else None)
                except (_Refused, _Full, TimeoutError) as exc:
                    status = 429 if isinstance(exc, _Full) else 503
                    message = str(exc) or f"tenant '{tenant}' did not load within {self.sup.config.load_wait:.0f}s"
                    code = status
                    if not started and scope["path"] in GENERATE and self._may_overflow(scope, tenant):
                        code = 0
                        await self._forward_peers(scope, receive, send, body, tenant, stream, message, session)
                        return
                    if started:
                        await self._stream_error(send, status, message)
                    else:
                        await _respond(send, *_error(status, message, code="model_unavailable" if status == 503 else "queue_full"),
                                       headers=[(b"retry-after", b"1" if status == 429 else b"5")])  # fmt: skip
                    return
                if path is None:
                    return  # the client left while it waited
                try:
                    code = await self._pipe(path, scope["method"], target, headers, body, send, gone, started)
                except _WorkerFailed as exc:
                    self.metrics.retries.labels(tenant).inc()
                    log.warning("%s: the worker failed before answering (%s); sending the request again (%d)", tenant, exc, attempt + 1)
                    await asyncio.sleep(0.2)
                    continue
                finally:
                    self._release(tenant)
                return
            code = 503
            message = f"tenant '{tenant}': its worker failed three times before answering"
            if started:
                await self._stream_error(send, 503, message)
            else:
                await _respond(send, *_error(503, message, code="model_unavailable"), headers=[(b"retry-after", b"5")])
        finally:
            gone.cancel()
            if code:
                self.metrics.requests.labels(tenant, str(code)).inc()

    async def _forward_peers(self, scope: Scope, receive: Receive, send: Send, body: bytes, tenant: str, stream: bool,
                             why: str | None = None, session: bool = False, model: Any = None) -> None:  # fmt: skip
        """Delegate to the tenant's peers (issue #22): the least busy verified one first, the next
        only while nothing was sent to the client; 503 naming every peer when none answers.
        ``session``: the body names one, which stays here (400). ``model``: the name asked for;
        one the index does not declare (``tenant:adapter``) is a 404 here, never every peer's question."""
        if session:  # its turns live here: a peer would answer without them, and keep its reply
            await _respond(send, *_error(400, f"session: tenant '{tenant}' is answered by a peer here; sessions do not cross hosts", param="session"))
            return
        idx = self.sup.idx
        if isinstance(model, str) and idx is not None and (problem := undeclared(idx, model)) is not None:
            await _respond(send, *_error(404, f"model: {problem}", param="model", code="model_not_found"))
            return
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await self._peer_attempt(scope, body, send, gone, tenant, stream)
        except _Fallback as exc:
            head = f"tenant '{tenant}': {why}; " if why else f"tenant '{tenant}' is not served here; "
            await _respond(send, *_error(503, head + str(exc), code="model_unavailable"), headers=[(b"retry-after", b"5")])
        finally:
            gone.cancel()

    async def _peer_attempt(self, scope: Scope, body: bytes, send: Send, gone: asyncio.Future[None], tenant: str, stream: bool,
                            x_zoo: dict[str, Any] | None = None, committed_to: Callable[[], None] = lambda: None,
                            first_token: float | None = None) -> int:  # fmt: skip
        """Each usable peer of the tenant in turn, until one answers (its status code); ``_Fallback``
        naming every peer once, and why, when none did and nothing was sent to the client."""
        fed = self.federation
        if not fed.polled.is_set():  # just started: wait for the first poll to say who is usable
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fed.polled.wait(), 5.0)
        # What describes the request, never a client's credentials (cookies, other keys): the fleet key speaks for it,
        # and asks for at most the class it grants (issue #31).
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() in TO_PEERS] + fed.headers()
        if (wanted := for_peer(scope.get(GRANTED))) is not None:
            headers.append((HEADER.lower().encode(), wanted.encode()))
        tried: dict[str, str] = {}
        # A peer that hangs (stopped, its link cut under a pooled connection) gives way after this.
        wait = first_token or self.sup.config.load_wait
        for peer in fed.candidates(tenant):
            try:
                code = await self._one_peer(peer, scope["path"], headers, body, send, gone, stream, wait, {**(x_zoo or {}), "host": peer.host},
                                            committed_to)  # fmt: skip
            except _Fallback as exc:
                log.warning("%s: peer %s did not answer (%s); trying the next", tenant, peer.host, exc)
                fed.failed(peer)
                tried[peer.host] = f"{peer.host}: {exc}"
                continue
            fed.answered(peer, code)
            return code
        names = "; ".join([*tried.values(), *fed.unusable(tenant, besides=set(tried))]) or "none declared"
        raise _Fallback(f"no peer could answer (peers: {names})", "peers")

    async def _one_peer(self, peer: Peer, target: str, headers: list[tuple[bytes, bytes]], body: bytes, send: Send, gone: asyncio.Future[None],
                        stream: bool, wait: float, x_zoo: dict[str, Any], committed_to: Callable[[], None]) -> int:  # fmt: skip
        """One delegated exchange, given up when a poll finds the peer gone or refused for this
        tenant: before its first token that is the next peer's turn (a stopped peer still accepts,
        and would hold the request for ``wait``); after it, the stream ends with an error event."""
        fed, committed = self.federation, False

        def commit() -> None:
            nonlocal committed
            committed = True
            committed_to()

        attempt: asyncio.Future[int] = asyncio.ensure_future(self._relay_peer(peer, target, headers, body, send, gone, stream, wait, x_zoo, commit))
        lost = fed.watch(peer)
        try:
            either: set[asyncio.Future[Any]] = {attempt, lost}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            fed.unwatch(peer, lost)
        if attempt.done():
            return attempt.result()
        attempt.cancel()  # closing its connection
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await attempt
        why = f"the poll found it {lost.result()}"
        if committed:
            await self._stream_error(send, 502, f"peer {peer.host} stopped answering midway ({why})")
            return 502
        raise _Fallback(why, "crashed")

    async def _relay_peer(self, peer: Peer, target: str, headers: list[tuple[bytes, bytes]], body: bytes, send: Send, gone: asyncio.Future[None],
                          stream: bool, wait: float, x_zoo: dict[str, Any], committed_to: Callable[[], None]) -> int:  # fmt: skip
        """One exchange with a peer, relayed only as ``peer_answer`` allows (issue #31): the head is
        ours, each document read by the bounded reader and written by us, the body decoded. Before
        anything reached the client, a failure, an answer not to relay or no first token within
        ``wait`` is a ``_Fallback``; after it, the stream ends with an error event naming the peer."""
        deadline = time.monotonic() + wait
        try:
            response = await self._exchange(self.federation.client(peer.endpoint), "POST", target, headers, body, gone, wait)
        except _WorkerFailed as exc:
            raise _Fallback(f"failed before answering ({exc})", "crashed") from exc
        except TimeoutError:
            raise _Fallback(f"no first token within {wait:g}s", "first_token_timeout") from None
        if response is None:
            return 499
        try:
            try:
                kind = judge(response.status_code, response.headers.get("content-type", ""), stream)
            except Refused as exc:
                said = error_message(await _read_some(response, MAX_ERROR)) if response.status_code >= 400 else ""
                raise _Fallback(str(exc) + (f": {said}" if said else ""), "failed") from None
            if kind == "error" or not stream:
                try:
                    data = await asyncio.wait_for(_read(response, MAX_ANSWER), max(1.0, deadline - time.monotonic()))
                    whole_answer = whole(response.status_code, data, x_zoo)
                except TimeoutError:
                    raise _Fallback(f"its answer did not arrive within {wait:g}s", "first_token_timeout") from None
                except Refused as exc:
                    raise _Fallback(str(exc), "failed") from None
                if kind == "answer":
                    committed_to()
                await _respond(send, response.status_code, whole_answer)
                return response.status_code
            return await self._relay_events(peer, response, send, gone, Events(x_zoo, MAX_ANSWER), deadline, wait, committed_to)
        finally:
            await response.aclose()

    async def _relay_events(self, peer: Peer, response: httpx.Response, send: Send, gone: asyncio.Future[None], events: Events, deadline: float,
                            wait: float, committed_to: Callable[[], None]) -> int:  # fmt: skip
        """A peer's event stream, each event checked (``Events``) before it is sent; see ``_relay_peer``."""
        started = False  # our head is out: from here on a failure ends the stream, never the next peer
        reading = response.aiter_bytes().__aiter__()  # decoded: a compressing proxy in front of the peer changes nothing
        while True:
            chunk: asyncio.Future[bytes] = asyncio.ensure_future(reading.__anext__())
            pair: set[asyncio.Future[Any]] = {chunk, gone}
            done, _ = await asyncio.wait(pair, timeout=None if started else max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED)
            if gone in done:
                chunk.cancel()
                return 499
            if chunk not in done:  # no first token in time: give it up (closing cancels its generation)
                chunk.cancel()
                raise _Fallback(f"no first token within {wait:g}s", "first_token_timeout")
            try:
                out = events.feed(chunk.result())
            except StopAsyncIteration:
                break
            except (httpx.HTTPError, OSError, Refused) as exc:
                why = str(exc) if isinstance(exc, Refused) else f"the answer broke off ({type(exc).__name__})"
                if not started:
                    raise _Fallback(why, "failed" if isinstance(exc, Refused) else "crashed") from None
                for event in exc.ready if isinstance(exc, Refused) else []:  # checked before the bad one
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                await self._stream_error(send, 502, f"peer {peer.host}: {why}")
                return 502
            if events.committed and not started:
                committed_to()
                await send({"type": "http.response.start", "status": 200, "headers": head(True)})
                started = True
            for event in out:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            if events.finished:
                break  # [DONE]: whatever the peer sends after it is not the answer's
        try:
            events.end()
        except Refused as exc:
            if not started:
                raise _Fallback(str(exc), "failed") from None
            await self._stream_error(send, 502, f"peer {peer.host}: {exc}")
            return 502
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return 200

    async def _forward_routed(self, scope: Scope, receive: Receive, send: Send, routed: _Routed, priority: int, stream: bool) -> None:
        """Each candidate in turn until one answers: the next only while nothing was sent to the client
        (its place refused, its queue full, its worker failing, no first token in time), never after."""
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in HOP]
        if "session" in routed.document:  # the session is the route's: it follows the conversation from model to model
            headers.append((ROUTE_HEADER.lower().encode(), routed.id.encode()))
        gone = asyncio.ensure_future(_disconnected(receive))
        failure: tuple[int, str] = (503, f"route '{routed.id}': none of its tenants is served here")
        try:
            for i, tenant in enumerate(routed.tenants):
                last = i == len(routed.tenants) - 1
                try:
                    body = await _bounded(routed.size, _with_model, routed.document, tenant)
                except ValueError:  # the same for every candidate: the first finds it, before anything is sent
                    await _respond(send, *_error(400, "body: holds a number too large for JSON to carry (such as 1e999)", param="body"))
                    return
                if tenant not in self.sup.slots:  # a peer's tenant (issue #22): "the small host handles simple, the large one complex"
                    if "session" in routed.document:  # its turns live here: a peer would answer without them, and keep its reply
                        failure = (503, f"{tenant}: answered by a peer, and a route session does not cross hosts")
                        routed.fell(tenant, "a route session does not cross hosts", self.metrics, "session")
                        continue
                    try:
                        await self._peer_attempt(scope, body, send, gone, tenant, stream, {"route": routed.report(tenant)},
                                                 functools.partial(routed.answered, tenant, self.metrics), routed.route.first_token_seconds)  # fmt: skip
                    except _Fallback as exc:
                        failure = (503, f"{tenant}: {exc}")
                        routed.fell(tenant, str(exc), self.metrics, exc.kind)
                        continue
                    return
                wait = self.sup.config.load_wait if last or routed.route.first_token_seconds is None else routed.route.first_token_seconds
                placing = asyncio.ensure_future(self._place(tenant, priority))
                try:
                    path = await self._wait(placing, gone, tenant, None, wait)
                except (_Refused, _Full, TimeoutError) as exc:
                    why = str(exc) or f"not loaded within {wait:g}s" + (f" ({slot.blocked})" if (slot := self.sup.slots.get(tenant)) and slot.blocked else "")
                    failure = (429 if isinstance(exc, _Full) else 503, f"{tenant}: {why}")
                    routed.fell(tenant, why, self.metrics, "queue_full" if isinstance(exc, _Full) else "unavailable")
                    continue
                if path is None:
                    return  # the client left
                try:
                    ttft = routed.route.first_token_seconds if stream else None  # a non-streaming answer's first token is not seen
                    code = await self._pipe_committed(self._client(path), scope["path"], headers, body, send, gone, stream, ttft,
                                                      {"route": routed.report(tenant)}, functools.partial(routed.answered, tenant, self.metrics))  # fmt: skip
                except _Fallback as exc:
                    failure = (503, f"{tenant}: {exc}")
                    routed.fell(tenant, str(exc), self.metrics, exc.kind)
                    continue
                finally:
                    self._release(tenant)
                self.metrics.requests.labels(tenant, str(code)).inc()
                return
            status, message = failure
            await _respond(send, *_error(status, f"route '{routed.id}': no tenant could answer; last: {message}", code="model_unavailable"),
                           headers=[(b"retry-after", b"5")])  # fmt: skip
        finally:
            gone.cancel()

    async def _pipe_committed(self, client: httpx.AsyncClient, target: str, headers: list[tuple[bytes, bytes]], body: bytes, send: Send,
                              gone: asyncio.Future[None], stream: bool, ttft: float | None, x_zoo: dict[str, Any],
                              committed_to: Callable[[], None], passes: frozenset[int] = frozenset({429})) -> int:  # fmt: skip
        """One exchange that another candidate (a route's next tenant, the next peer) may still take
        over: committed to the client only at its first token. ``x_zoo`` goes into the answer
        (on its last chunk): who answered and why. ``_Fallback`` before the first token: a
        failure, a status in ``passes`` or any 5xx, or no first token within ``ttft``."""
        deadline = time.monotonic() + ttft if ttft else None
        try:
            response = await self._exchange(client, "POST", target, headers, body, gone, ttft)
        except _WorkerFailed as exc:
            raise _Fallback(f"failed before answering ({exc})", "crashed") from exc
        except TimeoutError:
            raise _Fallback(f"no first token within {ttft:g}s", "first_token_timeout") from None
        if response is None:
            return 499
        try:
            if response.status_code >= 500 or response.status_code in passes:
                error = await _read(response, MAX_ANSWER)
                raise _Fallback(f"answered {response.status_code}: {await _bounded(len(error), _message_of, error)}", "failed")
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BACK | {b"content-length"}]
            if not stream or response.status_code != 200:
                data = await _read(response, MAX_ANSWER)
                try:  # an error answer says who gave it too (README: every answer)
                    data = await _bounded(len(data), _answer_with, data, x_zoo, response.status_code == 200)
                except ValueError as exc:
                    raise _Fallback(f"answered 200 with no JSON ({exc})", "failed") from None
                if response.status_code == 200:
                    committed_to()
                await send({"type": "http.response.start", "status": response.status_code, "headers": [*out, (b"content-length", str(len(data)).encode())]})
                await send({"type": "http.response.body", "body": data, "more_body": False})
                return response.status_code
            # What arrives before the first token is held, up to MAX_ANSWER bytes in all.
            committed, held, held_bytes, buffer = False, [], 0, _Events()
            reading = response.aiter_raw().__aiter__()
            while True:
                timeout = None if committed or deadline is None else max(0.0, deadline - time.monotonic())
                chunk: asyncio.Future[bytes] = asyncio.ensure_future(reading.__anext__())
                pair: set[asyncio.Future[Any]] = {chunk, gone}
                done, _ = await asyncio.wait(pair, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    chunk.cancel()
                    return 499
                if chunk not in done:  # no first token in time: give it up (closing cancels its generation)
                    chunk.cancel()
                    raise _Fallback(f"no first token within {ttft:g}s", "first_token_timeout")
                try:
                    data = chunk.result()
                except StopAsyncIteration:
                    break
                except (httpx.TransportError, OSError) as exc:
                    if not committed:
                        raise _Fallback(f"failed before the first token ({type(exc).__name__})", "crashed") from exc
                    await self._stream_error(send, 502, f"the answer failed midway: {type(exc).__name__}", x_zoo)
                    return 502
                events = buffer.feed(data)
                size = len(buffer.pending) + (0 if committed else held_bytes + sum(map(len, events)))
                if size > MAX_ANSWER:  # no answer of ours: one event this large, or this much before a first token
                    if not committed:
                        raise _Fallback(f"more than {MAX_ANSWER} bytes before a first token, or one event that large", "failed")
                    await self._stream_error(send, 502, "the answer sent an oversized event", x_zoo)
                    return 502
                for event in events:
                    if not committed:
                        held.append(event)
                        held_bytes += len(event)
                        if not await _bounded(len(event), _first_token, event):
                            continue
                        committed = True
                        committed_to()
                        await send({"type": "http.response.start", "status": 200, "headers": out})
                        events_out, held = held, []
                    else:
                        events_out = [event]
                    for e in events_out:
                        await send({"type": "http.response.body", "body": await _bounded(len(e), _with_x_zoo, e, x_zoo) + b"\n\n", "more_body": True})
            if not committed:
                raise _Fallback("its answer ended before a first token", "failed")
            await send({"type": "http.response.body", "body": bytes(buffer.pending), "more_body": False})
            return 200
        finally:
            await response.aclose()

    async def _exchange(self, client: httpx.AsyncClient, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes,
                        gone: asyncio.Future[None], timeout: float | None = None) -> httpx.Response | None:  # fmt: skip
        """Send the request to the worker; its response head, or None when the client left first.
        A non-streaming answer's head comes only when it is complete: the client is watched
        meanwhile, so one that leaves closes the worker's connection and so cancels its generation.
        Every forwarding path (plain, routed, peer) sends through here, so each gets ``_send``'s one retry."""
        sending: asyncio.Future[httpx.Response] = asyncio.ensure_future(_send(client, method, target, headers, body))
        waiting: set[asyncio.Future[Any]] = {sending, gone}
        await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not sending.done():
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError, OSError):
                await sending
            if not gone.done():
                raise TimeoutError  # no head within ``timeout``
            return None
        try:
            return sending.result()
        except (httpx.TransportError, OSError) as exc:
            raise _WorkerFailed(f"{type(exc).__name__}: {exc}") from exc

    async def _wait(self, placing: asyncio.Future[str], gone: asyncio.Future[None], tenant: str,
                    comment: Callable[[str], Awaitable[None]] | None, seconds: float | None = None) -> str | None:  # fmt: skip
        deadline = time.monotonic() + (self.sup.config.load_wait if seconds is None else seconds)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                placing.cancel()
                raise TimeoutError
            both: set[asyncio.Future[Any]] = {placing, gone}
            done, _ = await asyncio.wait(both, timeout=min(left, 2.0), return_when=asyncio.FIRST_COMPLETED)
            if placing in done:
                return placing.result()
            if gone in done:
                placing.cancel()
                return None
            if comment is not None:
                slot = self.sup.slots.get(tenant)
                what = slot.phase.replace("_", " ") if slot else "gone"
                if slot is not None and slot.phase == "fetching":
                    what += f" {slot.fetch_pct}%"
                await comment(f"waiting for {tenant}: {what}")

    async def _pipe(self, path: str, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes, send: Send,
                    gone: asyncio.Future[None], started: bool) -> int:  # fmt: skip
        """One exchange with the worker, its answer streamed to the client as it arrives."""
        response = await self._exchange(self._client(path), method, target, headers, body, gone)
        if response is None:
            return 499
        try:
            if not started:
                out = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BACK]
                await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            elif response.status_code != 200:  # our 200 and SSE comments went out already
                try:
                    error = await _read(response, 64 << 10)
                except _Fallback as exc:  # too long, or it broke off: what we can say of it
                    error = str(exc).encode()
                await self._stream_error(send, response.status_code, await _bounded(len(error), _message_of, error))
                return response.status_code
            reading = response.aiter_raw().__aiter__()
            while True:
                chunk: asyncio.Future[bytes] = asyncio.ensure_future(reading.__anext__())
                pair: set[asyncio.Future[Any]] = {chunk, gone}
                done, _ = await asyncio.wait(pair, return_when=asyncio.FIRST_COMPLETED)
                if chunk not in done:  # the client went away: closing the connection cancels the generation
                    chunk.cancel()
                    return 499
                try:
                    data = chunk.result()
                except StopAsyncIteration:
                    break
                except (httpx.TransportError, OSError) as exc:
                    log.warning("a worker's answer broke off: %s", exc)
                    if "text/event-stream" in response.headers.get("content-type", ""):
                        await self._stream_error(send, 502, f"the worker failed mid-answer: {type(exc).__name__}")
                    return 502
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return response.status_code
        finally:
            await response.aclose()

    async def _stream_error(self, send: Send, status: int, message: str, x_zoo: dict[str, Any] | None = None) -> None:
        """The stream's last event: the error, with ``x_zoo`` (a route's or a peer's answer says who gave it, errors too)."""
        event: dict[str, Any] = {"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error", "param": None,
                                           "code": status}, **({"x_zoo": x_zoo} if x_zoo else {})}  # fmt: skip
        await send({"type": "http.response.body", "body": f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode(), "more_body": False})

    # -- what the router answers itself ------------------------------------------------------------
    def _health(self) -> tuple[int, bytes]:
        sup = self.sup
        tenants: dict[str, Any] = {}
        t = time.monotonic()
        with sup.lock:
            for tid in sup.order:
                slot = sup.slots[tid]
                worker = slot.serving
                tenants[tid] = {"state": slot.phase, "pinned": slot.pinned, "model": worker.config.model if worker else None,
                                "version": worker.config.version if worker else None, "running": worker.stats.running if worker else 0,
                                "waiting": (worker.stats.waiting if worker else 0) + slot.queued, "inflight": slot.inflight,
                                "idle_seconds": round(t - slot.last_used, 1) if slot.last_used else None, "footprint": slot.footprint,
                                **({"fetch_pct": slot.fetch_pct} if slot.phase == "fetching" else {}),
                                **({"error": slot.refusal or slot.error} if slot.refusal or slot.error else {})}  # fmt: skip
        state = "stopping" if self.stopping else ("ready" if sup.ready_sent else "starting")
        body = {"state": state, "status": sup.status_line(), "budget": sup.budget, "tenants": tenants,
                **({"peers": self.federation.report()} if self.federation.table else {})}  # fmt: skip
        return (200 if state == "ready" else 503), json.dumps(body).encode()

    def _models(self) -> list[dict[str, Any]]:
        """Every tenant the host serves, loaded or not, with its adapters (as vLLM lists LoRA modules)."""
        idx = self.sup.idx
        if idx is None:
            return []
        data = []

        def card(mid: str, root: str, parent: str | None, state: str, **extra: Any) -> dict[str, Any]:
            return {"id": mid, "object": "model", "created": 0, "owned_by": "model-zoo", "root": root, "parent": parent, "x_zoo": {"state": state, **extra}}

        for tid in self.sup.order:
            slot, tenant = self.sup.slots[tid], idx.tenants[tid]
            worker = slot.serving
            root = f"{worker.config.model}@{worker.config.version}" if worker else pinned(idx, tid)
            refused = worker.config.refused_adapters if worker else {}
            # What peers compare with their index (issue #22): the digest vouches only for
            # exactly the pinned set; mid-swap or with a refused adapter there is none.
            digest = tenant_digest(idx, tid) if root == pinned(idx, tid) and not refused else None
            data.append(card(tid, root, None, slot.phase, model=root, digest=digest))
            data += [card(f"{tid}:{lid}", f"{lid}@{idx.loras[lid].version}", tid, slot.phase) for lid in tenant.loras if lid not in refused]
            if tenant.adapter_selection is not None:
                data.append(card(f"{tid}:auto", "chosen per request", tid, slot.phase))
        return data

    async def _metrics(self) -> bytes:
        """The router's own metrics, then every loaded worker's, each sample labelled with its tenant."""
        m, sup = self.metrics, self.sup
        with sup.lock:
            serving = {tid: s.path for tid, s in sup.slots.items() if s.path is not None}
            for tid, slot in sup.slots.items():
                m.loaded.labels(tid).set(1 if slot.path is not None else 0)
                m.footprint.labels(tid).set(slot.footprint)
                m.inflight.labels(tid).set(slot.inflight)
                counts = self.queues[tid].counts_by_class() if tid in self.queues else {}
                for name in ("system", "realtime", "default", "batch"):
                    m.waiting.labels(tid, name).set(counts.get(name, 0))
            if sup.budget is not None:
                m.budget.set(sup.budget)
            m.ready.set(1 if sup.ready_sent and not self.stopping else 0)

        async def scrape(tid: str, path: str) -> tuple[str, str]:
            try:
                response = await self._client(path).get("/metrics", timeout=2.0)
                return tid, response.text if response.status_code == 200 else ""
            except (httpx.HTTPError, OSError):
                return tid, ""

        texts = await asyncio.gather(*(scrape(tid, path) for tid, path in serving.items()))
        families: dict[str, Metric] = {}
        for tid, text in texts:
            try:
                parsed = list(text_string_to_metric_families(text))
            except ValueError:
                continue
            for family in parsed:
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
                for sample in family.samples:
                    merged.samples.append(sample._replace(labels={**sample.labels, "tenant": tid}))
        registry = CollectorRegistry()
        registry.register(_Static(list(families.values())))
        return generate_latest(m.registry) + generate_latest(registry)


class _Static:
    """A collector that yields metric families already gathered (the workers')."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families

    def describe(self) -> list[Metric]:
        return []


class _Events:
    """An SSE answer's events from its chunks, each chunk searched for an event's end once: linear
    in the answer however it is cut (joining and splitting the whole buffer at every chunk was
    quadratic: a peer sending a large event a few bytes at a time held the router's loop)."""

    def __init__(self) -> None:
        self.pending = bytearray()  # the event under way

    def feed(self, data: bytes) -> list[bytes]:
        """The events ``data`` completes (without their blank-line ends)."""
        seen = len(self.pending)  # it holds no blank line: only where the new bytes begin can one start
        self.pending += data
        if self.pending.find(b"\n\n", max(0, seen - 1)) < 0:
            return []
        *events, rest = bytes(self.pending).split(b"\n\n")  # each byte split once: at the chunk that ends its event
        self.pending = bytearray(rest)
        return events


class _Trace:
    """httpcore's trace extension: which steps of one exchange began, ended or failed."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    async def __call__(self, name: str, info: dict[str, Any]) -> None:
        self.seen.add(name.split(".", 1)[-1])  # 'http11.send_request_body.failed' -> 'send_request_body.failed'

    def unsent(self) -> bool:
        """Nothing of an answer came, and the server cannot have read the request: it went out on a
        pooled connection (one the server closed as we took it: a worker does after its 500s),
        or writing it failed. A request on a connection made for it that got no answer may have
        been acted on: that one is not sent again here (the callers decide, knowing the tenant)."""
        if "receive_response_headers.complete" in self.seen:
            return False
        connected = "connect_tcp.started" in self.seen or "connect_unix_socket.started" in self.seen
        failed_write = "send_request_headers.failed" in self.seen or "send_request_body.failed" in self.seen
        return not connected or failed_write


async def _send(client: httpx.AsyncClient, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes) -> httpx.Response:
    """The answer's head; a request that failed before it was sent goes once more. httpcore drops
    the failed connection, so the second try takes a connection that passed its readability check,
    or a new one (issue #31: after a worker's 500 the next request failed with ReadError)."""
    for attempt in (1, 2):
        trace = _Trace()
        request = client.build_request(method, target, headers=headers, content=body, extensions={"trace": trace})
        try:
            return await client.send(request, stream=True)
        except httpx.TransportError as exc:
            if attempt == 2 or isinstance(exc, httpx.TimeoutException) or not trace.unsent():
                raise
            log.info("%s %s: the connection failed before the request was sent (%s); sending it once more", method, target, type(exc).__name__)
    raise AssertionError("unreachable")


class _Refused(Exception):
    """The tenant cannot be served now (it does not fit, failed to load or fetch, is gone): 503."""


class _Full(Exception):
    """The tenant's worker and queue are full: 429."""


class _WorkerFailed(Exception):
    """The worker failed before its answer started: the request may go again."""


async def _read_some(response: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes of a failed answer, for its message, within 2 s; what arrived when the read fails."""
    data = bytearray()
    with contextlib.suppress(httpx.HTTPError, OSError, TimeoutError):
        async with asyncio.timeout(2.0):
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) >= limit:
                    break
    return bytes(data[:limit])


async def _read(response: httpx.Response, limit: int) -> bytes:
    """A body, at most ``limit`` bytes (a peer's answer is input); ``_Fallback`` when the read fails or passes it."""
    data = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > limit:
                raise _Fallback(f"an answer larger than {limit} bytes", "failed")
    except (httpx.HTTPError, OSError) as exc:
        raise _Fallback(f"the answer broke off ({type(exc).__name__})", "crashed") from exc
    return bytes(data)


def _message_of(body: bytes) -> str:
    """An error answer's message, on one line of at most 400 characters (a peer's answer is input)."""
    try:
        message = str(loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace")
    return " ".join(message[:400].split())


def _answer_with(data: bytes, x_zoo: dict[str, Any], required: bool) -> bytes:
    """A whole JSON answer with ``x_zoo`` merged into it; ``ValueError`` when it is no JSON and ``required``
    (a 200), else the bytes as they came (an error answer that is not ours to judge)."""
    try:
        document = loads(data)
    except ValueError:
        if required:
            raise
        return data
    if not isinstance(document, dict) and not required:
        return data
    return json.dumps(_merged(document, x_zoo)).encode()


class _Fallback(Exception):
    """A routed request's tenant could not answer before its first token: the next candidate may."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind  # the metric's reason label: a small fixed set


@dataclass
class _Routed:
    """A request for a route: the rule's choice, the candidates in order, what happened to them."""

    id: str
    route: RouteEntry
    rule: str
    tenants: list[str]
    document: dict[str, Any]
    chosen: str = ""  # the rules' choice, served here or not
    similarity: float | None = None  # the similarity rule's score, when one was evaluated
    similarity_unavailable: str | None = None  # why similarity rules could not be evaluated
    fallback_from: str | None = None
    reason: str | None = None
    size: int = 0  # the request body's bytes (what re-encoding it for each candidate costs)

    def fell(self, tenant: str, reason: str, metrics: _Metrics, kind: str) -> None:
        log.info("route %s: %s cannot answer (%s); trying the next candidate", self.id, tenant, reason)
        metrics.fallbacks.labels(self.id, tenant, kind).inc()
        if self.fallback_from is None:
            self.fallback_from, self.reason = tenant, reason

    def answered(self, tenant: str, metrics: _Metrics) -> None:
        metrics.routed.labels(self.id, self.rule, tenant).inc()

    def report(self, tenant: str) -> dict[str, Any]:
        """``x_zoo.route``: which tenant answered, by which rule (with the similarity it measured), and whom it stood in for and why."""
        return {"route": self.id, "tenant": tenant, "rule": self.rule,
                **({"similarity": round(self.similarity, 4)} if self.similarity is not None else {}),
                **({"similarity_unavailable": self.similarity_unavailable} if self.similarity_unavailable else {}),
                **({"fallback_from": self.fallback_from, "reason": self.reason} if self.fallback_from else {})}  # fmt: skip


def _first_token(event: bytes) -> bool:
    """An SSE event that commits the answer: text, the end, an error, or [DONE] (the role chunk does not)."""
    data = event.removeprefix(b"data: ").strip()
    if not event.startswith(b"data: ") or data == b"[DONE]":
        return data == b"[DONE]"
    try:
        document = loads(data)
    except ValueError:
        return True
    if not isinstance(document, dict) or "error" in document:
        return True  # not a chunk we know: it is the answer's, so it commits (never a second model's continuation)
    for choice in _choices(document):
        delta = choice.get("delta")
        if choice.get("finish_reason") or choice.get("text") or (isinstance(delta, dict) and delta.get("content")):
            return True
    return False


def _choices(document: dict[str, Any]) -> list[dict[str, Any]]:
    """A chunk's choices that are objects (a peer's answer is input like any other)."""
    choices = document.get("choices")
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


def _merged(document: Any, x_zoo: dict[str, Any]) -> Any:
    """``document`` with ``x_zoo`` added to its own (replaced when that is not an object)."""
    if isinstance(document, dict):
        own = document.get("x_zoo")
        document["x_zoo"] = {**(own if isinstance(own, dict) else {}), **x_zoo}
    return document


def _with_x_zoo(event: bytes, x_zoo: dict[str, Any]) -> bytes:
    """The last chunk (the one with a finish_reason, or an error event) says who answered (a route's tenant, a peer)."""
    if not event.startswith(b"data: {"):
        return event
    try:
        document = loads(event[6:])
    except ValueError:
        return event
    if not isinstance(document, dict) or not ("error" in document or any(c.get("finish_reason") for c in _choices(document))):
        return event
    return b"data: " + json.dumps(_merged(document, x_zoo)).encode()
