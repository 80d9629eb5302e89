"""Routes (issue #21): the rules' choice of a tenant, its candidates in turn, and a route's sessions (issue #32: a file of its own).

The decision itself is pure (``routing.choose`` over ``routing.features``); here it is made
without holding the loop (``bounded``; a similarity rule's embedding on its own thread), and
each candidate is tried until one answers: the next only while nothing was sent to the client.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from zoo_agent.resident.router.admission import Admission, QueueFull, Unavailable
from zoo_agent.resident.router.commit import pipe_committed
from zoo_agent.resident.router.delegate import Delegation
from zoo_agent.resident.router.endpoints import Metrics
from zoo_agent.resident.router.federation import Federation
from zoo_agent.resident.router.remote import Remotes
from zoo_agent.resident.router.upstream import HOP, Clients, Fallback, bounded
from zoo_agent.resident.routing import Features, candidates, features, last_user_text, needs_similarity
from zoo_agent.resident.routing import choose as choose_tenant
from zoo_agent.resident.sessions.store import remove_session, session_lock
from zoo_agent.resident.similarity import Similarity
from zoo_agent.resident.slots import SlotTable
from zoo_agent.resident.sessions.transcript import SessionDamaged, SessionError, read_session, valid_id
from zoo_agent.resident.wire.documents import RouteReport, dump
from zoo_agent.resident.wire.headers import SESSION_ROUTE
from zoo_agent.resident.wire.http import Receive, Scope, Send, disconnected, error, respond

if TYPE_CHECKING:
    from zoo_agent.index.model import RouteEntry
    from zoo_agent.store.zoo import Zoo

__all__ = ["Routed", "Routes"]

log = logging.getLogger("zoo_agent.resident")

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


@dataclass
class Routed:
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

    def fell(self, tenant: str, reason: str, metrics: Metrics, kind: str) -> None:
        log.info("route %s: %s cannot answer (%s); trying the next candidate", self.id, tenant, reason)
        metrics.fallbacks.labels(self.id, tenant, kind).inc()
        if self.fallback_from is None:
            self.fallback_from, self.reason = tenant, reason

    def answered(self, tenant: str, metrics: Metrics) -> None:
        metrics.routed.labels(self.id, self.rule, tenant).inc()

    def report(self, tenant: str) -> dict[str, Any]:
        """``x_zoo.route``: which tenant answered, by which rule (with the similarity it measured), and whom it stood in for and why."""
        return dump(RouteReport.model_validate({"route": self.id, "tenant": tenant, "rule": self.rule,
                                                **({"similarity": round(self.similarity, 4)} if self.similarity is not None else {}),
                                                **({"similarity_unavailable": self.similarity_unavailable} if self.similarity_unavailable else {}),
                                                **({"fallback_from": self.fallback_from, "reason": self.reason} if self.fallback_from else {})}))  # fmt: skip

class Routes:
    """A route's request from decision to answer, over the router's parts (it holds none of its own)."""

    def __init__(self, table: SlotTable, admission: Admission, delegation: Delegation, federation: Federation, clients: Clients,
                 similarity: Similarity, metrics: Metrics, zoo: Zoo, load_wait: float, remotes: Remotes | None = None) -> None:  # fmt: skip
        self.table, self.admission, self.delegation, self.federation, self.clients = table, admission, delegation, federation, clients
        self.similarity, self.metrics, self.zoo, self.load_wait = similarity, metrics, zoo, load_wait
        self.remotes = remotes  # the host's remote tenants (issue #36)

    async def choose(self, rid: str, route: RouteEntry, document: dict[str, Any], size: int) -> Routed:
        """The route's decision; the message is embedded only when a similarity rule would be tried.
        The features are linear in the message, ``size`` bytes of body: a large one is read off the loop."""
        f, text = await bounded(size, _features, route, document)
        why = None
        if text is not None:
            scores, why = await self.similarity.scores(rid, text)
            f = replace(f, similarity=scores)
        choice = choose_tenant(route, f)
        tried = [t for t in candidates(route, choice.tenant) if t in self.table.slots or self.federation.peers_of(t)]  # here, or at a peer
        return Routed(rid, route, choice.rule, tried, document, chosen=choice.tenant, similarity=choice.similarity, similarity_unavailable=why,
                       size=size)  # fmt: skip

    def session(self, route: str, sid: str, method: str) -> tuple[int, bytes]:
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

    async def forward(self, scope: Scope, receive: Receive, send: Send, routed: Routed, priority: int, stream: bool) -> None:
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
                    fell = await self._peer(scope, body, send, gone, routed, tenant, stream)
                else:
                    fell = await self._here(scope, headers, body, send, gone, routed, tenant, priority, stream, last)
                if fell is None:
                    return
                failure = fell
            status, message = failure
            await respond(send, *error(status, f"route '{routed.id}': no tenant could answer; last: {message}", code="model_unavailable"),
                           headers=[(b"retry-after", b"5")])  # fmt: skip
        finally:
            gone.cancel()

    async def _peer(self, scope: Scope, body: bytes, send: Send, gone: asyncio.Future[None], routed: Routed, tenant: str,
                    stream: bool) -> tuple[int, str] | None:  # fmt: skip
        """A candidate that peers serve: None when it answered, else why it fell through (status, message)."""
        if "session" in routed.document:  # its turns live here: a peer would answer without them, and keep its reply
            routed.fell(tenant, "a route session does not cross hosts", self.metrics, "session")
            return 503, f"{tenant}: answered by a peer, and a route session does not cross hosts"
        try:
            await self.delegation.attempt(scope, body, send, gone, tenant, stream, {"route": routed.report(tenant)},
                                          functools.partial(routed.answered, tenant, self.metrics), routed.route.first_token_seconds)  # fmt: skip
        except Fallback as exc:
            routed.fell(tenant, str(exc), self.metrics, exc.kind)
            return 503, f"{tenant}: {exc}"
        return None

    async def _here(self, scope: Scope, headers: list[tuple[bytes, bytes]], body: bytes, send: Send, gone: asyncio.Future[None], routed: Routed,
                    tenant: str, priority: int, stream: bool, last: bool) -> tuple[int, str] | None:  # fmt: skip
        """A candidate this host serves (its worker, or a remote server): None when it answered or its client left,
        else why it fell through (status, message)."""
        remote = self.remotes is not None and tenant in self.remotes
        if remote and "session" in routed.document:  # a remote keeps no turns of ours: it would answer without them
            routed.fell(tenant, "a route session is kept by local tenants only", self.metrics, "session")
            return 503, f"{tenant}: a remote tenant, and a route session is kept by local tenants only"
        wait = self.load_wait if last or routed.route.first_token_seconds is None else routed.route.first_token_seconds
        placing = asyncio.ensure_future(self.admission.place(tenant, priority))
        try:
            path = await self.admission.wait(placing, gone, tenant, None, wait)
        except (Unavailable, QueueFull, TimeoutError) as exc:
            why = str(exc) or f"not loaded within {wait:g}s" + (f" ({slot.blocked})" if (slot := self.table.slots.get(tenant)) and slot.blocked else "")
            routed.fell(tenant, why, self.metrics, "queue_full" if isinstance(exc, QueueFull) else "unavailable")
            return 429 if isinstance(exc, QueueFull) else 503, f"{tenant}: {why}"
        if path is None:
            return None  # the client left
        try:
            ttft = routed.route.first_token_seconds if stream else None  # a non-streaming answer's first token is not seen
            if remote and self.remotes is not None:  # relayed as a peer's answer is, never piped (issue #36)
                code = await self.remotes.attempt(tenant, scope["path"], routed.document, routed.size, send, gone, stream, priority,
                                                  {"route": routed.report(tenant)}, functools.partial(routed.answered, tenant, self.metrics),
                                                  ttft)  # fmt: skip
            else:
                code = await pipe_committed(self.clients.to(path), scope["path"], headers, body, send, gone, stream, ttft,
                                            {"route": routed.report(tenant)}, functools.partial(routed.answered, tenant, self.metrics))  # fmt: skip
        except Fallback as exc:
            routed.fell(tenant, str(exc), self.metrics, exc.kind)
            return 503, f"{tenant}: {exc}"
        finally:
            self.admission.release(tenant)
        self.metrics.requests.labels(tenant, str(code)).inc()
        return None
