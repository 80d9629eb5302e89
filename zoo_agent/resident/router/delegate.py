"""Delegation: a request answered by the tenant's peers (issues #22, #31, #32).

The least busy verified peer first, the next only while nothing was sent to the client; each
answer relayed only as ``peer_answer`` allows. A delegated request keeps the headers that
describe it (``TO_PEERS``), never a client's credentials: the fleet key speaks for it, and asks
for at most the class granted here (``GRANTED``, ``for_peer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from zoo_agent.resident.router.federation import Federation
from zoo_agent.resident.router.peers import Peer, undeclared
from zoo_agent.resident.router.relay import relay
from zoo_agent.resident.router.upstream import Fallback
from zoo_agent.resident.wire.headers import PRIORITY
from zoo_agent.resident.wire.http import Receive, Scope, Send, disconnected, error, respond, stream_error
from zoo_agent.resident.wire.priority import for_peer

if TYPE_CHECKING:
    from zoo_agent.index.model import Index

__all__ = ["GRANTED", "TO_PEERS", "Delegation"]

log = logging.getLogger("zoo_agent.resident")

#: The request headers a delegated request keeps (with the fleet key, X-Zoo-Peer and the priority for_peer added).
TO_PEERS = frozenset({b"content-type", b"accept", b"user-agent"})
#: The scope key for a request's granted priority, when it named one (what for_peer asks a peer for).
GRANTED = "zoo.priority"

class Delegation:
    """The tenant's peers, tried in turn; ``index`` is the index the router serves now."""

    def __init__(self, federation: Federation, load_wait: float, index: Callable[[], Index | None]) -> None:
        self.federation, self.load_wait, self.index = federation, load_wait, index

    async def forward_peers(self, scope: Scope, receive: Receive, send: Send, body: bytes, tenant: str, stream: bool,
                             why: str | None = None, session: bool = False, model: Any = None) -> None:  # fmt: skip
        """Delegate to the tenant's peers (issue #22): the least busy verified one first, the next
        only while nothing was sent to the client; 503 naming every peer when none answers.
        ``session``: the body names one, which stays here (400). ``model``: the name asked for;
        one the index does not declare (``tenant:adapter``) is a 404 here, never every peer's question."""
        if session:  # its turns live here: a peer would answer without them, and keep its reply
            await respond(send, *error(400, f"session: tenant '{tenant}' is answered by a peer here; sessions do not cross hosts", param="session"))
            return
        idx = self.index()
        if isinstance(model, str) and idx is not None and (problem := undeclared(idx, model)) is not None:
            await respond(send, *error(404, f"model: {problem}", param="model", code="model_not_found"))
            return
        gone = asyncio.ensure_future(disconnected(receive))
        try:
            await self.attempt(scope, body, send, gone, tenant, stream)
        except Fallback as exc:
            head = f"tenant '{tenant}': {why}; " if why else f"tenant '{tenant}' is not served here; "
            await respond(send, *error(503, head + str(exc), code="model_unavailable"), headers=[(b"retry-after", b"5")])
        finally:
            gone.cancel()

    async def attempt(self, scope: Scope, body: bytes, send: Send, gone: asyncio.Future[None], tenant: str, stream: bool,
                            x_zoo: dict[str, Any] | None = None, committed_to: Callable[[], None] = lambda: None,
                            first_token: float | None = None) -> int:  # fmt: skip
        """Each usable peer of the tenant in turn, until one answers (its status code); ``Fallback``
        naming every peer once, and why, when none did and nothing was sent to the client."""
        fed = self.federation
        if not fed.polled.is_set():  # just started: wait for the first poll to say who is usable
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fed.polled.wait(), 5.0)
        # What describes the request, never a client's credentials (cookies, other keys): the fleet key speaks for it,
        # and asks for at most the class it grants (issue #31).
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() in TO_PEERS] + fed.headers()
        if (wanted := for_peer(scope.get(GRANTED))) is not None:
            headers.append((PRIORITY.lower().encode(), wanted.encode()))
        tried: dict[str, str] = {}
        # A peer that hangs (stopped, its link cut under a pooled connection) gives way after this.
        wait = first_token or self.load_wait
        for peer in fed.candidates(tenant):
            try:
                code = await self._one_peer(peer, scope["path"], headers, body, send, gone, stream, wait, {**(x_zoo or {}), "host": peer.host},
                                            committed_to)  # fmt: skip
            except Fallback as exc:
                log.warning("%s: peer %s did not answer (%s); trying the next", tenant, peer.host, exc)
                fed.failed(peer)
                tried[peer.host] = f"{peer.host}: {exc}"
                continue
            fed.answered(peer, code)
            return code
        names = "; ".join([*tried.values(), *fed.unusable(tenant, besides=set(tried))]) or "none declared"
        raise Fallback(f"no peer could answer (peers: {names})", "peers")

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
            await stream_error(send, 502, f"peer {peer.host} stopped answering midway ({why})", x_zoo)
            return 502
        raise Fallback(why, "crashed")

    async def _relay_peer(self, peer: Peer, target: str, headers: list[tuple[bytes, bytes]], body: bytes, send: Send, gone: asyncio.Future[None],
                          stream: bool, wait: float, x_zoo: dict[str, Any], committed_to: Callable[[], None]) -> int:  # fmt: skip
        """One exchange with a peer, relayed only as ``peer_answer`` allows (``relay``, issue #31): before
        anything reached the client, a failure, an answer not to relay or no first token within ``wait``
        is a ``Fallback``; after it, the stream ends with an error event naming the peer."""
        return await relay(self.federation.client(peer.endpoint), target, headers, body, send, gone, stream, wait, x_zoo, committed_to,
                           f"peer {peer.host}")  # fmt: skip
