"""The outermost ASGI middleware of the router and of each worker: what a request must be before any route sees it (issue #17).

- Path: matched as sent. The ``path`` the apps route on is the raw one, undecoded: ``/v1/chat%2fcompletions``
  was served as ``/v1/chat/completions`` (a proxy that allows or denies by path sees the encoded one). No route
  of ours holds a ``%``, so an encoded path matches none: a 404 (issue #32).
- Head: at most ``MAX_HEAD`` (16 KiB) of request line and headers, else a 431 naming ``headers``. h11 limits
  only a head still arriving; 40 KiB that came in one read were accepted (issue #32).

- Framing: ``Transfer-Encoding`` together with ``Content-Length`` is refused (400, and the
  connection closes): two framings of one body are how requests are smuggled.
- Size: the body limit holds for the bytes actually read, whatever the framing. Checking
  only ``Content-Length`` let a 5 MB chunked body through, and the worker grew to 1.5 GB.
  The body is read here, at most ``max_body`` bytes, then handed to the app in one piece;
  one byte more is a 413 (uvicorn discards the rest of that body without buffering it).
- Auth: with an API key, ``/v1/*`` and ``/models/*`` (load and unload, issue #34) need ``Authorization: Bearer <key>`` (the scheme is
  required: a bare key was accepted), compared in constant time, checked before the body is read.
  A request from a peer (``X-Zoo-Peer``, issue #22) needs the fleet key instead, always: a
  host with no fleet key answers no peer, and a client key never passes for a peer's.
  The priority key (issue #31) is a client key that also grants classes above ``default``:
  a request that presents it is marked ``scope[PRIVILEGED]`` for the router.
- Answering before the body is read (413, 401): the rest of the body is read and thrown away
  first, at most ``DRAIN_BYTES`` and ``DRAIN_SECONDS``, then the answer goes out (issue #31).
  A server that closes a connection with unread bytes in it makes the kernel reset it, and
  the reset takes the answer with it: a client still sending (``Connection: close``, HTTP/1.0)
  saw a reset where a 413 was due. Past either bound the answer says ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import hmac

from zoo_agent.resident.wire.headers import PEER
from zoo_agent.resident.wire.http import MAX_HEAD, ApiError, App, Message, Receive, Scope, Send, head_size

__all__ = ["DRAIN_BYTES", "DRAIN_SECONDS", "PRIVILEGED", "Gate"]

#: The scope key the gate sets on a request that presented the priority key (a client cannot set scope keys).
PRIVILEGED = "zoo.privileged"
#: The paths that need a bearer token where a key is set: the API, and loading and unloading by hand.
AUTHORIZED = ("/v1/", "/models/")
#: How much of a refused body is read (and thrown away) so that its sender can read the answer.
DRAIN_BYTES = 16 << 20
DRAIN_SECONDS = 5.0



async def _reply(send: Send, status: int, message: str, *, param: str | None, code: str | None = None, close: bool = False,
                 kind: str | None = None, extra: list[tuple[bytes, bytes]] | None = None) -> None:  # fmt: skip
    body = ApiError(status, message, param, code, kind).body()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Gate:
    def __init__(self, app: App, *, max_body: int, api_key: str | None = None, fleet_key: str | None = None, priority_key: str | None = None) -> None:
        self.app, self.max_body = app, max_body
        self.api_key = api_key.encode() if api_key is not None else None
        self.fleet_key = fleet_key.encode() if fleet_key is not None else None
        self.priority_key = priority_key.encode() if priority_key is not None else None

    def _authorized(self, scope: Scope, headers: list[tuple[bytes, bytes]]) -> bool:
        if not str(scope.get("path", "")).startswith(AUTHORIZED):
            return True
        if any(k.lower() == PEER.lower().encode() for k, _ in headers):
            return self.fleet_key is not None and _bearer(headers, self.fleet_key)
        if self.priority_key is not None and _bearer(headers, self.priority_key):
            scope[PRIVILEGED] = True
            return True
        return self.api_key is None or _bearer(headers, self.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if (raw := scope.get("raw_path")) is not None:
            scope["path"] = raw.decode("latin-1")  # matched as sent: an encoded "/" is no "/"
        headers = scope.get("headers", [])
        waits = any(k.lower() == b"expect" and v.strip().lower() == b"100-continue" for k, v in headers)  # sends only when asked
        if (size := head_size(scope)) > MAX_HEAD:
            closing = waits or not await _drain(receive)
            await _reply(send, 431, f"headers: the request line and headers are {size} bytes, at most {MAX_HEAD}", param="headers",
                         code="headers_too_large", close=closing)  # fmt: skip
            return
        lengths = [v for k, v in headers if k.lower() == b"content-length"]
        if lengths and any(k.lower() == b"transfer-encoding" for k, _ in headers):
            await _reply(send, 400, "body: Transfer-Encoding and Content-Length together frame the body twice; send one of them",
                         param="body", code="ambiguous_framing", close=True)  # fmt: skip
            return
        if lengths and lengths[0].strip().isdigit() and int(lengths[0]) > self.max_body:
            closing = int(lengths[0]) > DRAIN_BYTES or waits or not await _drain(receive)
            await _reply(send, 413, f"body: larger than {self.max_body} bytes", param="body", code="body_too_large", close=closing)
            return
        if not self._authorized(scope, headers):
            closing = waits or not await _drain(receive)
            await _reply(send, 401, "missing or wrong bearer token (Authorization: Bearer <key>)", param=None, code="invalid_api_key",
                         kind="authentication_error", extra=[(b"www-authenticate", b"Bearer")], close=closing)  # fmt: skip
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away before its body arrived
            body += message.get("body", b"")
            if len(body) > self.max_body:
                closing = message.get("more_body", False) and not await _drain(receive)
                await _reply(send, 413, f"body: larger than {self.max_body} bytes", param="body", code="body_too_large", close=closing)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)


async def _drain(receive: Receive) -> bool:
    """Read the rest of the body and throw it away: True when it ended within the bounds."""
    read = 0
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while read <= DRAIN_BYTES:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return False
                read += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return True
    except TimeoutError:
        pass
    return False


def _bearer(headers: list[tuple[bytes, bytes]], key: bytes) -> bool:
    given = [v for k, v in headers if k.lower() == b"authorization"]
    if len(given) != 1:
        return False
    scheme, _, token = given[0].strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body once, in one message; then the server's own receive (so a disconnect is still seen)."""
    pending = [body]

    async def replayed() -> Message:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        return await receive()

    return replayed
