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
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from zoo_agent.resident.router.admission import Admission, QueueFull, Unavailable
from zoo_agent.resident.router.commit import pipe_committed
from zoo_agent.resident.router.delegate import GRANTED, Delegation
from zoo_agent.resident.router.federation import Federation
from zoo_agent.resident.router.upstream import HOP, Clients, Fallback, WorkerFailed, bounded, pipe
from zoo_agent.resident.inbound import GENERATE, Host, Rejected, parse_request
from zoo_agent.resident.router.peers import pinned, tenant_digest
from zoo_agent.resident.routing import Features, candidates, choose, features, last_user_text, needs_similarity
from zoo_agent.resident.slots import SlotTable
from zoo_agent.resident.sessions import remove_session, session_lock
from zoo_agent.resident.similarity import Similarity, route_tasks
from zoo_agent.resident.transcript import SessionDamaged, SessionError, read_session, valid_id
from zoo_agent.resident.wire.gate import PRIVILEGED, Gate
from zoo_agent.resident.wire.headers import PEER, PRIORITY, SESSION_ROUTE
from zoo_agent.resident.wire.http import MAX_BODY, Receive, Scope, Send, disconnected, error, header, respond, stream_error
from zoo_agent.resident.wire.priority import CLASSES, BadPriority, PriorityNotAllowed, grant

if TYPE_CHECKING:
    import socket

    from zoo_agent.index.model import Index, RouteEntry
    from zoo_agent.resident.config import ResidentConfig
    from zoo_agent.store.zoo import Zoo

__all__ = ["Keys", "Router"]

log = logging.getLogger("zoo_agent.resident")

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
        self.metrics = _Metrics()
        self.admission = Admission(table, config.aging_seconds, config.load_wait)
        self.clients = Clients()
        self.lora_tenant: dict[str, str] = {}  # adapter id -> the tenant declaring it (vLLM's load route names only the adapter)
        self.routes: dict[str, RouteEntry] = {}  # the host's routes (issue #21): a model name whose rules choose the tenant
        self.similarity = Similarity(zoo)  # their similarity rules' embedders (loaded only where a rule needs one)
        self.federation = Federation(host_id, keys.fleet, self.metrics.registry, config.peer_poll_seconds)  # the peers (issue #22)
        self.delegation = Delegation(self.federation, config.load_wait, lambda: self.idx)
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
        self.routes = {rid: idx.routes[rid] for rid in idx.hosts[host_id].routes if rid in idx.routes}
        self.similarity.take(route_tasks(self.zoo, idx, host_id))
        self.federation.take_index(idx, host_id)
        self.idx = idx

    def start(self, listener: socket.socket, private: socket.socket | None = None) -> None:
        """Serve the public socket, and ``private`` (a unix socket in the supervisor's own
        directory) where workers ask other tenants, as the route's summarizer (issue #21)."""
        import uvicorn

        app = Gate(self, max_body=MAX_BODY, api_key=self.keys.api, fleet_key=self.keys.fleet, priority_key=self.keys.priority)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=int(self.config.drain_seconds) + 1,
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
                await self.clients.close()
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
            await respond(send, status, data)
            return
        if path == "/metrics" and method == "GET":
            text = await self._metrics()
            await respond(send, 200, text, [(b"content-type", b"text/plain; version=0.0.4")])
            return
        if path == "/v1/models" and method == "GET":
            await respond(send, 200, json.dumps({"object": "list", "data": self._models()}).encode())
            return
        from_peer = header(scope, PEER)
        parse = functools.partial(parse_request, method, path, scope.get("query_string", b""), body, self._host(),
                                  content_type=header(scope, "content-type"), from_peer=from_peer is not None)  # fmt: skip
        parsed = await bounded(len(body), parse)  # linear in the body: a large one is parsed off the loop
        if isinstance(parsed, Rejected):
            await respond(send, *error(parsed.status, parsed.message, param=parsed.param, code=parsed.code))
            return
        tenant, document = parsed.tenant, parsed.document
        if parsed.session is not None and tenant in self.routes:
            # Reading (up to 64 MiB, validated) is no work for the loop that streams every answer.
            answer = await asyncio.get_running_loop().run_in_executor(None, self._route_session, tenant, parsed.session, method)
            await respond(send, *answer)
            return
        route = self.routes.get(tenant) if path in GENERATE else None
        if route is not None:
            routed = await self._choose(tenant, route, document, len(body))
            tenant = routed.tenants[0] if routed.tenants else routed.chosen
        stream, priority = False, self._default_priority(tenant)
        if path in GENERATE and method == "POST":
            stream = document.get("stream") is True
            field = document.get("priority")
            named = [v for k, v in scope.get("headers", []) if k.lower() == PRIORITY.lower().encode()]
            if len(named) > 1:  # the router would check one and the worker serve another
                await respond(send, *error(400, f"{PRIORITY}: sent {len(named)} times; send it once", param=PRIORITY))
                return
            sent = named[0] if named else None
            # A field of the wrong type is the worker's 400 to give, with the rest of the body's checks.
            field = field if isinstance(field, int) and not isinstance(field, bool) else None
            # A route's request may be answered by any of its candidates: it may name no better than the worst one's own class.
            own = max(self._default_priority(t) for t in routed.tenants) if route is not None and routed.tenants else priority
            try:  # above default only with the priority key (issue #31); a peer's request is a client's
                priority = grant(sent.decode("latin-1") if sent is not None else None, field, priority, scope.get(PRIVILEGED) is True, own)
            except BadPriority as exc:
                await respond(send, *error(403 if isinstance(exc, PriorityNotAllowed) else 400, str(exc), param=exc.param,
                                             code="priority_not_allowed" if isinstance(exc, PriorityNotAllowed) else None))  # fmt: skip
                return
            scope[GRANTED] = priority if sent is not None or field is not None else None  # what a peer is asked for: for_peer
        if tenant not in self.table.slots and route is None and path in GENERATE:  # served by peers only (parse_request checked)
            await self.delegation.forward_peers(scope, receive, send, body, tenant, document.get("stream") is True, session=document.get("session") is not None,
                                      model=document.get("model"))  # fmt: skip
            return
        if route is not None:
            await self._forward_routed(scope, receive, send, routed, priority, stream)
            return
        await self._forward(scope, receive, send, body, tenant, priority, stream, session=document.get("session") is not None)

    async def _choose(self, rid: str, route: RouteEntry, document: dict[str, Any], size: int) -> _Routed:
        """The route's decision; the message is embedded only when a similarity rule would be tried.
        The features are linear in the message, ``size`` bytes of body: a large one is read off the loop."""
        f, text = await bounded(size, _features, route, document)
        why = None
        if text is not None:
            scores, why = await self.similarity.scores(rid, text)
            f = replace(f, similarity=scores)
        choice = choose(route, f)
        tried = [t for t in candidates(route, choice.tenant) if t in self.table.slots or self.federation.peers_of(t)]  # here, or at a peer
        return _Routed(rid, route, choice.rule, tried, document, chosen=choice.tenant, similarity=choice.similarity, similarity_unavailable=why,
                       size=size)  # fmt: skip

    def _host(self) -> Host:
        """What ``parse_request`` needs to know of this host: its own dicts, which ``take_index`` replaces whole."""
        fed = self.federation
        return Host(self.table.order, self.routes, fed.accepts, lambda tenant: bool(fed.peers_of(tenant)), self.lora_tenant)

    def _route_session(self, route: str, sid: str, method: str) -> tuple[int, bytes]:
        """GET or DELETE a route's session. Its transcript is a file any of the route's workers
        may write (under their lock, by rename): reading it here needs no worker loaded."""
        sessions = self.zoo.route_dir(route) / "sessions"
        try:
            path = sessions / f"{valid_id(sid)}.json"
        except SessionError as exc:
            return error(400, str(exc), param="session")
        if method == "DELETE":
            with session_lock(sessions):  # a commit under way finishes first, or sees no session
                found = remove_session(sessions.parent, sid)
            if not found:
                return error(404, f"session '{sid}' does not exist (route '{route}')", param="session", code="session_not_found")
            return 200, json.dumps({"id": sid, "object": "session.deleted", "deleted": True}).encode()
        if method != "GET":
            return error(405, "Method Not Allowed")
        try:
            transcript = read_session(path)
        except FileNotFoundError:
            return error(404, f"session '{sid}' does not exist (route '{route}')", param="session", code="session_not_found")
        except SessionDamaged as exc:
            return error(422, f"session '{sid}' is damaged ({exc}); delete it (DELETE /v1/sessions/{sid}?model={route})", param="session",
                          code="session_damaged")  # fmt: skip
        return 200, json.dumps(transcript.document()).encode()

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
        gone = asyncio.ensure_future(disconnected(receive))
        code = 0
        try:
            for attempt in range(3):
                if not started and (why := self._overflows(scope, tenant)) is not None:
                    code = 0  # counted per peer
                    await self.delegation.forward_peers(scope, receive, send, body, tenant, stream, why, session)
                    return
                placing = asyncio.ensure_future(self.admission.place(tenant, priority))
                try:
                    path = await self.admission.wait(placing, gone, tenant, comment if stream else None)
                except (Unavailable, QueueFull, TimeoutError) as exc:
                    status = 429 if isinstance(exc, QueueFull) else 503
                    message = str(exc) or f"tenant '{tenant}' did not load within {self.config.load_wait:.0f}s"
                    code = status
                    if not started and scope["path"] in GENERATE and self._may_overflow(scope, tenant):
                        code = 0
                        await self.delegation.forward_peers(scope, receive, send, body, tenant, stream, message, session)
                        return
                    if started:
                        await stream_error(send, status, message)
                    else:
                        await respond(send, *error(status, message, code="model_unavailable" if status == 503 else "queue_full"),
                                       headers=[(b"retry-after", b"1" if status == 429 else b"5")])  # fmt: skip
                    return
                if path is None:
                    return  # the client left while it waited
                try:
                    code = await pipe(self.clients.to(path), scope["method"], target, headers, body, send, gone, started)
                except WorkerFailed as exc:
                    self.metrics.retries.labels(tenant).inc()
                    log.warning("%s: the worker failed before answering (%s); sending the request again (%d)", tenant, exc, attempt + 1)
                    await asyncio.sleep(0.2)
                    continue
                finally:
                    self.admission.release(tenant)
                return
            code = 503
            message = f"tenant '{tenant}': its worker failed three times before answering"
            if started:
                await stream_error(send, 503, message)
            else:
                await respond(send, *error(503, message, code="model_unavailable"), headers=[(b"retry-after", b"5")])
        finally:
            gone.cancel()
            if code:
                self.metrics.requests.labels(tenant, str(code)).inc()


    async def _forward_routed(self, scope: Scope, receive: Receive, send: Send, routed: _Routed, priority: int, stream: bool) -> None:
        """Each candidate in turn until one answers: the next only while nothing was sent to the client
        (its place refused, its queue full, its worker failing, no first token in time), never after."""
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in HOP]
        if "session" in routed.document:  # the session is the route's: it follows the conversation from model to model
            headers.append((SESSION_ROUTE.lower().encode(), routed.id.encode()))
        gone = asyncio.ensure_future(disconnected(receive))
        failure: tuple[int, str] = (503, f"route '{routed.id}': none of its tenants is served here")
        try:
            for i, tenant in enumerate(routed.tenants):
                last = i == len(routed.tenants) - 1
                try:
                    body = await bounded(routed.size, _with_model, routed.document, tenant)
                except ValueError:  # the same for every candidate: the first finds it, before anything is sent
                    await respond(send, *error(400, "body: holds a number too large for JSON to carry (such as 1e999)", param="body"))
                    return
                if tenant not in self.table.slots:  # a peer's tenant (issue #22): "the small host handles simple, the large one complex"
                    if "session" in routed.document:  # its turns live here: a peer would answer without them, and keep its reply
                        failure = (503, f"{tenant}: answered by a peer, and a route session does not cross hosts")
                        routed.fell(tenant, "a route session does not cross hosts", self.metrics, "session")
                        continue
                    try:
                        await self.delegation.attempt(scope, body, send, gone, tenant, stream, {"route": routed.report(tenant)},
                                                 functools.partial(routed.answered, tenant, self.metrics), routed.route.first_token_seconds)  # fmt: skip
                    except Fallback as exc:
                        failure = (503, f"{tenant}: {exc}")
                        routed.fell(tenant, str(exc), self.metrics, exc.kind)
                        continue
                    return
                wait = self.config.load_wait if last or routed.route.first_token_seconds is None else routed.route.first_token_seconds
                placing = asyncio.ensure_future(self.admission.place(tenant, priority))
                try:
                    path = await self.admission.wait(placing, gone, tenant, None, wait)
                except (Unavailable, QueueFull, TimeoutError) as exc:
                    why = str(exc) or f"not loaded within {wait:g}s" + (f" ({slot.blocked})" if (slot := self.table.slots.get(tenant)) and slot.blocked else "")
                    failure = (429 if isinstance(exc, QueueFull) else 503, f"{tenant}: {why}")
                    routed.fell(tenant, why, self.metrics, "queue_full" if isinstance(exc, QueueFull) else "unavailable")
                    continue
                if path is None:
                    return  # the client left
                try:
                    ttft = routed.route.first_token_seconds if stream else None  # a non-streaming answer's first token is not seen
                    code = await pipe_committed(self.clients.to(path), scope["path"], headers, body, send, gone, stream, ttft,
                                                      {"route": routed.report(tenant)}, functools.partial(routed.answered, tenant, self.metrics))  # fmt: skip
                except Fallback as exc:
                    failure = (503, f"{tenant}: {exc}")
                    routed.fell(tenant, str(exc), self.metrics, exc.kind)
                    continue
                finally:
                    self.admission.release(tenant)
                self.metrics.requests.labels(tenant, str(code)).inc()
                return
            status, message = failure
            await respond(send, *error(status, f"route '{routed.id}': no tenant could answer; last: {message}", code="model_unavailable"),
                           headers=[(b"retry-after", b"5")])  # fmt: skip
        finally:
            gone.cancel()


    # -- what the router answers itself ------------------------------------------------------------
    def _health(self) -> tuple[int, bytes]:
        tenants: dict[str, Any] = {}
        t = time.monotonic()
        with self.table.lock:
            for tid in self.table.order:
                slot = self.table.slots[tid]
                worker = slot.serving
                tenants[tid] = {"state": slot.phase, "pinned": slot.pinned, "model": worker.config.model if worker else None,
                                "version": worker.config.version if worker else None, "running": worker.stats.running if worker else 0,
                                "waiting": (worker.stats.waiting if worker else 0) + slot.queued, "inflight": slot.inflight,
                                "idle_seconds": round(t - slot.last_used, 1) if slot.last_used else None, "footprint": slot.footprint,
                                **({"fetch_pct": slot.fetch_pct} if slot.phase == "fetching" else {}),
                                **({"error": slot.refusal or slot.error} if slot.refusal or slot.error else {})}  # fmt: skip
        state = "stopping" if self.admission.stopping else ("ready" if self.is_ready() else "starting")
        body = {"state": state, "status": self.status_line(), "budget": self.table.budget, "tenants": tenants,
                **({"peers": self.federation.report()} if self.federation.table else {})}  # fmt: skip
        return (200 if state == "ready" else 503), json.dumps(body).encode()

    def _models(self) -> list[dict[str, Any]]:
        """Every tenant the host serves, loaded or not, with its adapters (as vLLM lists LoRA modules)."""
        idx = self.idx
        if idx is None:
            return []
        data = []

        def card(mid: str, root: str, parent: str | None, state: str, **extra: Any) -> dict[str, Any]:
            return {"id": mid, "object": "model", "created": 0, "owned_by": "model-zoo", "root": root, "parent": parent, "x_zoo": {"state": state, **extra}}

        for tid in self.table.order:
            slot, tenant = self.table.slots[tid], idx.tenants[tid]
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
        m, table = self.metrics, self.table
        with table.lock:
            serving = {tid: s.path for tid, s in table.slots.items() if s.path is not None}
            for tid, slot in table.slots.items():
                m.loaded.labels(tid).set(1 if slot.path is not None else 0)
                m.footprint.labels(tid).set(slot.footprint)
                m.inflight.labels(tid).set(slot.inflight)
                counts = self.admission.counts_by_class(tid)
                for name in ("system", "realtime", "default", "batch"):
                    m.waiting.labels(tid, name).set(counts.get(name, 0))
            if table.budget is not None:
                m.budget.set(table.budget)
            m.ready.set(1 if self.is_ready() and not self.admission.stopping else 0)

        async def scrape(tid: str, path: str) -> tuple[str, str]:
            try:
                response = await self.clients.to(path).get("/metrics", timeout=2.0)
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


