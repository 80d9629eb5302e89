"""The router's connections to its workers' private unix sockets (issue #32: the router's hop).

A worker is our own process on a unix socket, so the router speaks HTTP/1.1 to it with h11 (which
uvicorn and httpcore use too) over the event loop's own socket calls: a request goes out in one send
(head and body together: one wake-up of the worker's loop, not two), an answer comes back as an
``httpx.Response`` streamed from the connection, and the connection goes back to a small pool once the
answer was read to its end. httpx's client and httpcore's pool cost about 0.3 ms of the router's CPU a
request (anyio's locks and checkpoints, an exception map per read, a trace, cookies, an SSL context per
client) for nothing a worker's socket needs. Peers, over TCP, keep httpx.

The one retry (issue #31): a request on a pooled connection that failed before any byte of its answer
came goes once more on a new connection (the worker closed the idle connection as we took it: it does
after a 500); one that a connection made for it got no answer to may have been acted on, and is not
sent again here (the callers decide: a restarted worker, the next candidate).
"""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import h11
import httpx

__all__ = ["WorkerClient", "worker_client"]

#: An idle connection is used again within this (uvicorn closes a worker's idle ones after 5 s) and
#: at most this many are kept (httpx's defaults).
KEEPALIVE_SECONDS = 5.0
MAX_IDLE = 20
CONNECT_SECONDS = 5.0
_READ = 64 << 10
#: What ``request`` writes itself (the router's forwarded headers never hold them: upstream.HOP).
_OURS = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})


class _Unsent(Exception):
    """No byte of an answer came: on a pooled connection, the worker closed it as we took it; ``wrote``: the
    request's one send failed, so the worker got none of it, or a part. Either may go again, on a new connection."""

    def __init__(self, message: str, wrote: bool = False) -> None:
        super().__init__(message)
        self.wrote = wrote


class _Connection:
    """One connection to a worker: h11's client state over a non-blocking unix socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.h11 = sock, h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.received = 0  # bytes of the current answer read so far

    @classmethod
    async def open(cls, path: str) -> _Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(CONNECT_SECONDS):
                await asyncio.get_running_loop().sock_connect(sock, path)
        except TimeoutError:
            cls(sock).close()  # its cancelled connect may still be registered
            raise httpx.ConnectTimeout(f"{path}: no connection within {CONNECT_SECONDS:g}s") from None
        except OSError as exc:
            sock.close()
            raise httpx.ConnectError(f"{path}: {exc.strerror or exc}") from exc
        except BaseException:
            cls(sock).close()
            raise
        return cls(sock)

    def usable(self) -> bool:
        """An idle connection to use again: not kept too long, and nothing to read (a worker that closed it)."""
        if time.monotonic() - self.idle_since > KEEPALIVE_SECONDS or self.sock.fileno() < 0:
            return False
        poll = select.poll()
        poll.register(self.sock, select.POLLIN)
        return not poll.poll(0)

    async def request(self, method: str, target: str, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> h11.Response:
        """Send the request whole, in one send; the answer's head. ``_Unsent`` when the send failed, or when
        the connection ended before any byte of an answer (the caller knows whether it was a pooled one)."""
        head = h11.Request(method=method, target=target, headers=[(b"host", b"worker"), (b"content-length", str(len(body)).encode()), *headers])
        data = b"".join(self.h11.send(event) or b"" for event in (head, h11.Data(data=body), h11.EndOfMessage()))
        self.received = 0
        try:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)
        except OSError as exc:
            raise _Unsent(f"WriteError: {exc.strerror or exc}", wrote=True) from exc
        while True:
            try:
                event = await self.next_event()
            except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
                if not self.received:
                    raise _Unsent(str(exc)) from exc
                raise
            if isinstance(event, h11.Response):
                return event
            # an InformationalResponse (1xx): the real head follows

    async def next_event(self) -> Any:
        """h11's next event of the answer, reading as it needs; httpx's errors for a broken one."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc)) from exc
            if event is h11.NEED_DATA:
                try:
                    data = await asyncio.get_running_loop().sock_recv(self.sock, _READ)
                except OSError as exc:
                    raise httpx.ReadError(f"{type(exc).__name__}: {exc.strerror or exc}") from exc
                if not data and self.h11.their_state is h11.SEND_RESPONSE:
                    raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
                self.received += len(data)
                self.h11.receive_data(data)
                continue
            if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("the worker closed the connection mid-answer")
            return event

    def close(self) -> None:
        """Close the socket, its selector registrations first. A read or send cancelled a moment ago
        still has its fd registered (its done callback unregisters it only at the next loop step);
        closed under it, epoll forgets the fd but asyncio's map does not, and the next socket given
        that fd number (the next request's, in this same step) is never watched: it waits forever."""
        fd = self.sock.fileno()
        if fd >= 0:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop runs: none has it registered
                pass
            else:
                loop.remove_reader(fd)  # cancels the registered callback, so its done callback leaves the fd alone
                loop.remove_writer(fd)
        self.sock.close()


class _Body(httpx.AsyncByteStream):
    """An answer's body as it arrives; its connection goes back to the pool once read to the end, else closes."""

    def __init__(self, client: WorkerClient, conn: _Connection) -> None:
        self.client, self.conn = client, conn
        self.ended = self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while not self.ended:
            event = await self.conn.next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.ended = True

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.give_back(self.conn, reusable=self.ended)


class WorkerClient(httpx.AsyncClient):
    """A pooled client of the worker on ``path``: ``exchange`` for the router's requests; httpx's own
    ``get``/``send`` (the ``/metrics`` scrape) reach the same connections through ``send``."""

    def __init__(self, path: str) -> None:
        # A transport that is never called: every request goes through ``send`` below (httpx's default
        # one would build an SSL context, about 0.1 s, for a socket that never speaks TLS).
        super().__init__(transport=httpx.AsyncBaseTransport(), base_url="http://worker", timeout=httpx.Timeout(None, connect=CONNECT_SECONDS))
        self.path = path
        self._idle: list[_Connection] = []

    async def exchange(self, method: str, target: str, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> httpx.Response:
        """The answer's head, its body streamed from the connection (``aclose`` it). A pooled connection that
        fails before any byte of the answer came is the worker's closing it: the request goes once more."""
        conn, pooled = self._take(), True
        if conn is None:
            conn, pooled = await _Connection.open(self.path), False
        try:
            head = await conn.request(method, target, headers, body)
        except _Unsent as exc:
            conn.close()
            if not (pooled or exc.wrote):
                raise httpx.RemoteProtocolError(str(exc)) from exc
            conn = await _Connection.open(self.path)
            head = await self._again(conn, method, target, headers, body)
        except BaseException:
            conn.close()  # cancelled (the client left, a deadline) or broken: its state is unknown
            raise
        return httpx.Response(head.status_code, headers=head.headers.raw_items(), stream=_Body(self, conn))

    @staticmethod
    async def _again(conn: _Connection, method: str, target: str, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> h11.Response:
        """The one retry, on a connection made for it: a failure now is the caller's."""
        try:
            return await conn.request(method, target, headers, body)
        except _Unsent as exc:
            conn.close()
            raise httpx.RemoteProtocolError(str(exc)) from exc
        except BaseException:
            conn.close()
            raise

    async def send(self, request: httpx.Request, *, stream: bool = False, **_: Any) -> httpx.Response:
        """httpx's entry (``get``, ``post``): the same exchange, within the request's read timeout, if any."""
        timeout = request.extensions.get("timeout", {}).get("read")
        async with asyncio.timeout(timeout):
            headers = [(k, v) for k, v in request.headers.raw if k.lower() not in _OURS]
            response = await self.exchange(request.method, request.url.raw_path.decode("ascii"), headers, request.content)
            response.request = request
            if not stream:
                try:
                    await response.aread()
                finally:
                    await response.aclose()
        return response

    def _take(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn
            conn.close()
        return None

    def give_back(self, conn: _Connection, reusable: bool) -> None:
        """A connection whose answer ended: kept for the next request when both sides are done, else closed."""
        if reusable and not self.is_closed and len(self._idle) < MAX_IDLE and conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    def _close_idle(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    async def aclose(self) -> None:
        self._close_idle()
        await super().aclose()

    async def __aexit__(self, kind: type[BaseException] | None = None, value: BaseException | None = None,
                        traceback: TracebackType | None = None) -> None:  # fmt: skip
        self._close_idle()  # httpx's own does not call aclose
        await super().__aexit__(kind, value, traceback)


def worker_client(path: str) -> WorkerClient:
    """A pooled client of the worker listening on ``path``; no connection is made before the first request."""
    return WorkerClient(path)
