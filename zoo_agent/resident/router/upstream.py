"""One exchange with a worker or a peer, and the answer streamed back (issue #32).

Every forwarding path (a tenant's, a route's, a peer's) sends through ``exchange``, so each gets
``_send``'s one retry of a request that never left; ``pipe`` streams a plain tenant's answer back
unparsed. What is read of an answer is bounded (``MAX_ANSWER``); work linear in someone else's
data runs in the loop up to ``INLINE`` bytes, else on two threads (``bounded``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import zlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx

from zoo_agent.jsonbound import loads
from zoo_agent.resident.router.sockets import WorkerClient, worker_client
from zoo_agent.resident.wire.headers import PEER, SESSION_ROUTE
from zoo_agent.resident.wire.http import Send, stream_error

__all__ = ["HOP", "HOP_BACK", "INLINE", "MAX_ANSWER", "Clients", "Fallback", "WorkerFailed", "attempt", "bounded", "decoded", "exchange", "message_of", "pipe",
           "read_body", "read_some"]  # fmt: skip

log = logging.getLogger("zoo_agent.resident")

#: The most a worker's or a peer's answer (or one of its events) may be; ours are far smaller.
MAX_ANSWER = 16 << 20
#: Request headers that describe this hop, not the request (RFC 9110 §7.6.1), the client's
#: credential (the router checked it; workers, on private sockets, never see it), and the
#: header only the router may set.
HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"proxy-authorization", b"proxy-connection",
                 b"host", b"content-length", b"authorization", b"expect", SESSION_ROUTE.lower().encode(), PEER.lower().encode()})  # fmt: skip
HOP_BACK = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"server", b"date"})
#: Request or answer data up to this size is worked on in the router's loop (parsing 64 kB of
#: JSON or running the route's rules over it takes well under a millisecond); more, on ``_WORK``.
INLINE = 64 << 10
#: Two threads for larger bodies, answers and events: at most two such parses at once (the memory
#: bound, a few times 16 MiB at most), and the loop, which feeds the watchdog, never waits for one.
_WORK = ThreadPoolExecutor(max_workers=2, thread_name_prefix="router-work")
T = TypeVar("T")


async def bounded(size: int, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)``, whose cost is linear in ``size`` bytes of someone else's data: in the loop
    when that is at most ``INLINE``, else on ``_WORK`` (the loop answers /health meanwhile)."""
    if size <= INLINE:
        return work(*args)
    return await asyncio.get_running_loop().run_in_executor(_WORK, functools.partial(work, *args))


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
    or a new one (issue #31: after a worker's 500 the next request failed with ReadError). A worker's
    client (``sockets.py``) keeps the same rule itself."""
    if isinstance(client, WorkerClient):
        return await client.exchange(method, target, headers, body)
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


class WorkerFailed(Exception):
    """The worker failed before its answer started: the request may go again."""


#: Decoded bytes per decompression step: a 250 kB gzip that inflates to 256 MiB was decoded in one
#: call by httpx (the limit was checked after it), 1.9 GiB for twelve such answers (issue #31).
_STEP = 64 << 10


async def decoded(response: httpx.Response) -> AsyncIterator[bytes]:
    """The answer's body, decoded as its ``Content-Encoding`` says (identity, gzip, deflate), never
    more than ``_STEP`` bytes at a time, so a caller's limit holds for what is decoded, not only for
    what arrived. We ask peers for identity; an encoding we do not read is a failed attempt."""
    if response.is_stream_consumed:  # read in full already (a response made in memory): httpx decoded it
        yield response.content
        return
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        async for chunk in response.aiter_raw():
            yield chunk
        return
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise Fallback(f"an answer in an encoding we do not read ({encoding[:40]!r})", "failed")
    inflate = zlib.decompressobj(zlib.MAX_WBITS | 32 if encoding != "deflate" else zlib.MAX_WBITS)  # 32: gzip or zlib header
    try:
        async for chunk in response.aiter_raw():
            data = chunk
            while data:
                out = inflate.decompress(data, _STEP)
                data = inflate.unconsumed_tail
                if out:
                    yield out
                await asyncio.sleep(0)  # a bomb decodes in steps the loop sees between
        if tail := inflate.flush(_STEP):
            yield tail
    except zlib.error as exc:
        raise Fallback(f"an answer that does not decode as {encoding} ({exc})", "failed") from None


async def read_some(response: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes of a failed answer, for its message, within 2 s; what arrived when the read fails."""
    data = bytearray()
    with contextlib.suppress(httpx.HTTPError, OSError, TimeoutError, Fallback):
        async with asyncio.timeout(2.0):
            async for chunk in decoded(response):
                data += chunk
                if len(data) >= limit:
                    break
    return bytes(data[:limit])


async def read_body(response: httpx.Response, limit: int) -> bytes:
    """A body, at most ``limit`` bytes (a peer's answer is input); ``Fallback`` when the read fails or passes it."""
    data = bytearray()
    try:
        async for chunk in decoded(response):
            data += chunk
            if len(data) > limit:
                raise Fallback(f"an answer larger than {limit} bytes", "failed")
    except (httpx.HTTPError, OSError) as exc:
        raise Fallback(f"the answer broke off ({type(exc).__name__})", "crashed") from exc
    return bytes(data)


def message_of(body: bytes) -> str:
    """An error answer's message, on one line of at most 400 characters (a peer's answer is input)."""
    try:
        message = str(loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace")
    return " ".join(message[:400].split())


class Fallback(Exception):
    """A routed request's tenant could not answer before its first token: the next candidate may."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind  # the metric's reason label: a small fixed set


async def attempt(client: httpx.AsyncClient, target: str, headers: list[tuple[bytes, bytes]], body: bytes, gone: asyncio.Future[None],
                  first_token: float | None) -> httpx.Response | None:  # fmt: skip
    """A POST that a next candidate (another tenant of the route, another peer) may still take over:
    a failure or no head within ``first_token`` is ``Fallback``; None when the client left first."""
    try:
        return await exchange(client, "POST", target, headers, body, gone, first_token)
    except WorkerFailed as exc:
        raise Fallback(f"failed before answering ({exc})", "crashed") from exc
    except TimeoutError:  # only with a first_token deadline
        raise Fallback(f"no first token within {first_token or 0:g}s", "first_token_timeout") from None


async def exchange(client: httpx.AsyncClient, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes,
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
        raise WorkerFailed(f"{type(exc).__name__}: {exc}") from exc


async def pipe(client: httpx.AsyncClient, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes, send: Send,
                gone: asyncio.Future[None], started: bool) -> int:  # fmt: skip
    """One exchange with the worker, its answer streamed to the client as it arrives."""
    response = await exchange(client, method, target, headers, body, gone)
    if response is None:
        return 499
    try:
        if started and response.status_code != 200:  # our 200 and SSE comments went out already
            try:
                error = await read_body(response, 64 << 10)
            except Fallback as exc:  # too long, or it broke off: what we can say of it
                error = str(exc).encode()
            await stream_error(send, response.status_code, await bounded(len(error), message_of, error))
            return response.status_code
        if not started:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BACK]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
        events = "text/event-stream" in response.headers.get("content-type", "")
        failed = await (_relay_events(response, send, gone) if events else _relay_whole(response, send, gone))
        return failed or response.status_code
    finally:
        await response.aclose()


async def _relay_events(response: httpx.Response, send: Send, gone: asyncio.Future[None]) -> int | None:
    """A stream's chunks as they come, the client watched between them: one that leaves closes the
    worker's connection, which cancels the generation. The status when it did not end well."""
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
            await stream_error(send, 502, f"the worker failed mid-answer: {type(exc).__name__}")
            return 502
        if data:
            await send({"type": "http.response.body", "body": data, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return None


async def _relay_whole(response: httpx.Response, send: Send, gone: asyncio.Future[None]) -> int | None:
    """A whole answer (not a stream), passed on unparsed. Its head came when it was complete (the worker
    answers once generation ended), so nothing is left to cancel: it is read without a task a chunk."""
    try:
        async for data in response.aiter_raw():
            if data:
                await send({"type": "http.response.body", "body": data, "more_body": True})
    except (httpx.TransportError, OSError) as exc:
        log.warning("a worker's answer broke off: %s", exc)
        return 502
    if gone.done():
        return 499
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return None


class Clients:
    """One pooled HTTP client per worker socket, made on first use, closed when its worker is gone."""

    def __init__(self) -> None:
        self._by_path: dict[str, httpx.AsyncClient] = {}

    def to(self, path: str) -> httpx.AsyncClient:
        client = self._by_path.get(path)
        if client is None:
            client = self._by_path[path] = worker_client(path)
        return client

    def forget(self, path: str, loop: asyncio.AbstractEventLoop | None) -> None:
        """A worker is gone: close the connections to its socket (on ``loop``, from another thread)."""
        client = self._by_path.pop(path, None)
        if client is not None and loop is not None:
            asyncio.run_coroutine_threadsafe(client.aclose(), loop)

    async def close(self) -> None:
        for client in list(self._by_path.values()):
            await client.aclose()
