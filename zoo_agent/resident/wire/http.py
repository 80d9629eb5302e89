"""The ASGI primitives and the OpenAI error body, once for the gate, the router and the workers (issue #32).

Every error answer the resident gives is one ``ApiError``: its status, message, ``param`` and
``code``, and a ``type`` by one rule (``error_type``): a 5xx, or a 429 (the request was fine,
this host cannot take it now), is a ``server_error``; any other 4xx an ``invalid_request_error``;
the gate's 401 names its own (``authentication_error``). The same error is a JSON body
(``body``) or, once a stream has begun, its last SSE event (``event``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["MAX_BODY", "MAX_HEAD", "ApiError", "App", "Message", "Receive", "Scope", "Send", "disconnected", "error", "error_type", "head_size", "header", "respond",
           "stream_error"]

log = logging.getLogger("zoo_agent.resident")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The most a request body may be, at the router and at each worker.
MAX_BODY = 1 << 20
#: The most a request's line and headers may be, at the router and at each worker: h11's own limit, which it
#: applies only to a head still arriving (one read of 40 KiB passed). nginx's default is stricter per line
#: (8 KiB, ``large_client_header_buffers 4 8k``), looser in all (32 KiB).
MAX_HEAD = 16 << 10


def head_size(scope: Scope) -> int:
    """About the bytes of a request's line and headers as sent: ``NAME: VALUE\r\n`` each."""
    line = len(scope.get("method", "")) + len(scope.get("raw_path") or b"") + len(scope.get("query_string", b"")) + 12
    return line + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", []))


def error_type(status: int) -> str:
    """The OpenAI error ``type`` for a status: one rule for every answer the resident gives."""
    return "server_error" if status >= 500 or status == 429 else "invalid_request_error"


class ApiError(Exception):
    """An answer that is an error: what the client is told, as JSON or as a stream's last event."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | int | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or error_type(status)

    def document(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return json.dumps(self.document()).encode()

    def event(self, x_zoo: dict[str, Any] | None = None) -> bytes:
        """The stream's last event and its ``[DONE]``, with ``x_zoo`` (who answered, errors too)."""
        event = {**self.document(), **({"x_zoo": x_zoo} if x_zoo else {})}
        return f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> tuple[int, bytes]:
    """``(status, body)`` of an ``ApiError``, for ``respond``."""
    return status, ApiError(status, message, param, code).body()


async def respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A whole JSON answer (``headers`` after ours: a later content-type wins for the client that reads the last)."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]})  # fmt: skip
    await send({"type": "http.response.body", "body": body, "more_body": False})


def header(scope: Scope, name: str) -> str | None:
    """The first value of a request header, or None."""
    wanted = name.lower().encode()
    value = next((v for k, v in scope.get("headers", []) if k.lower() == wanted), None)
    return value.decode("latin-1") if value is not None else None


async def disconnected(receive: Receive) -> None:
    """Returns when the client has gone (what every exchange watches beside its worker)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def stream_error(send: Send, status: int, message: str, x_zoo: dict[str, Any] | None = None) -> None:
    """A started stream's last event: the error, with ``x_zoo`` (a route's or a peer's answer says who gave it, errors too)."""
    await send({"type": "http.response.body", "body": ApiError(status, message, code=status).event(x_zoo), "more_body": False})
