"""The router's connections to its workers' private unix sockets (issue #32: the router's hop).

httpx's own transport reaches the socket through anyio (a checkpoint, a lock and an exception map per
read and write), builds an SSL context for each client, and writes a request's head and its body in two
sends: the worker's loop wakes twice for one request, each time on a busy host a context switch away.
Here httpcore still speaks HTTP/1.1, pools the connections and reports the trace that ``upstream._send``
decides its one retry from; only the bytes' way to the socket is ours: the loop's own socket calls, and a
request's bytes held until its answer is read, so they go in one send. Nothing here is reached over TCP.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
from typing import Any

import httpcore
import httpx

__all__ = ["worker_client"]


class _Stream(httpcore.AsyncNetworkStream):
    """One connection to a worker: writes are held and go out, in one send, before the next read."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock, self._held = sock, bytearray()

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._held += buffer  # HTTP/1.1 without Expect: nothing is read before the whole request went

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        loop = asyncio.get_running_loop()
        if self._held:
            data, self._held = bytes(self._held), bytearray()
            try:  # the request is whole in one buffer: a send that fails leaves the worker an incomplete one
                async with asyncio.timeout(timeout):
                    await loop.sock_sendall(self._sock, data)
            except TimeoutError as exc:
                raise httpcore.WriteTimeout(str(exc)) from exc
            except OSError as exc:
                raise httpcore.WriteError(str(exc) or type(exc).__name__) from exc
        try:
            async with asyncio.timeout(timeout):
                return await loop.sock_recv(self._sock, max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        self._sock.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:  # fmt: skip
        raise httpcore.ConnectError("a worker's socket speaks plain HTTP")

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # httpcore's check of an idle pooled connection: readable = closed (or unasked bytes)
            if self._sock.fileno() < 0:
                return True
            poll = select.poll()
            poll.register(self._sock, select.POLLIN)
            return bool(poll.poll(0))
        return self._sock if info == "socket" else None


class _Backend(httpcore.AsyncNetworkBackend):
    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_connect(sock, path)
        except TimeoutError as exc:
            sock.close()
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            sock.close()
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        except BaseException:
            sock.close()
            raise
        return _Stream(sock)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _Transport(httpx.AsyncHTTPTransport):
    """httpx's transport over our backend: its request and answer mapping and its exceptions, unchanged."""

    def __init__(self, path: str) -> None:  # no super().__init__: that builds an SSL context and a pool we do not use
        self._pool = httpcore.AsyncConnectionPool(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0,  # httpx's defaults
                                                  uds=path, retries=0, network_backend=_Backend())  # fmt: skip


class _WorkerClient(httpx.AsyncClient):
    """A client of one worker: a request goes straight to the transport. A worker's socket needs none of what
    ``AsyncClient.send`` adds around it (auth, redirects, cookies, event hooks): a tenth of the router's time per request."""

    def __init__(self, path: str) -> None:
        self._worker = _Transport(path)
        super().__init__(transport=self._worker, base_url="http://worker", timeout=httpx.Timeout(None, connect=5.0))

    async def send(self, request: httpx.Request, *, stream: bool = False, **_: Any) -> httpx.Response:
        response = await self._worker.handle_async_request(request)
        response.request = request
        if not stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response


def worker_client(path: str) -> httpx.AsyncClient:
    """A pooled client of the worker listening on ``path``; no connection is made before the first request."""
    return _WorkerClient(path)
