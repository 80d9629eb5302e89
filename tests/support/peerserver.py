"""A peer that says whatever a test wants it to, for tests only (issue #31).

It answers the router's polls as a well-behaved peer would (``/health``, ``/v1/models`` with
the cards the test gives it: the model and digest the origin's index pins), and every
``POST`` with ``answer``: raw bytes written to the socket as they are (a status line,
headers and a body), so a test can send what no HTTP framework would (a redirect, a 101, a
body labelled gzip, an SSE event with a carriage return, JSON nested 100,000 levels). What
each POST carried (path, headers, body) is kept in ``posts``.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["PeerStandIn", "chunk", "completion", "http", "sse"]


def http(status: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """One HTTP/1.1 response, framed by Content-Length; the connection closes after it (and says so:
    a pooled connection the server closed would fail the next request before it is sent)."""
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def completion(text: str = "peer words", model: str = "big") -> dict[str, Any]:
    return {"id": "chatcmpl-peer", "object": "chat.completion", "created": 0, "model": model, "system_fingerprint": "m2@v1",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}  # fmt: skip


def chunk(content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta = {"content": content} if content is not None else {"role": "assistant"}
    return {"id": "chatcmpl-peer", "object": "chat.completion.chunk", "created": 0, "model": "big",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip


def sse(*events: bytes, headers: dict[str, str] | None = None) -> bytes:
    """A streamed answer: the events as given (each ends with its blank line), then the connection closes."""
    head = ["HTTP/1.1 200 OK", "Content-Type: text/event-stream", "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + b"".join(events)


def good_json() -> bytes:
    return http("200 OK", json.dumps(completion()).encode(), {"Content-Type": "application/json"})


def good_sse() -> bytes:
    return sse(*(b"data: " + json.dumps(c).encode() + b"\n\n" for c in (chunk(), chunk("peer"), chunk(" words", "length"))), b"data: [DONE]\n\n")


def gzipped(body: bytes, content_type: str = "application/json") -> bytes:
    return http("200 OK", gzip.compress(body), {"Content-Type": content_type, "Content-Encoding": "gzip"})


class PeerStandIn(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, cards: list[dict[str, Any]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.cards = cards
        #: What a POST is answered with: bytes, or a function of the request's body giving bytes or
        #: a list of (bytes, seconds to wait after) pieces (a slow stream).
        self.answer: bytes | Callable[[dict[str, Any]], bytes | list[tuple[bytes, float]]] = good_json()
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> PeerStandIn:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: PeerStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/health":
            doc: Any = {"state": "ready", "tenants": {c["id"]: {"running": 0, "waiting": 0} for c in self.server.cards}}
        elif self.path == "/v1/models":
            doc = {"object": "list", "data": self.server.cards}
        else:
            doc = None
        self.wfile.write(http("200 OK", json.dumps(doc).encode(), {"Content-Type": "application/json"}) if doc is not None else http("404 Not Found", b"{}"))
        self.close_connection = True

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.posts.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        answer = self.server.answer
        pieces = answer(json.loads(body)) if callable(answer) else answer
        for data, wait in [(pieces, 0.0)] if isinstance(pieces, bytes) else pieces:
            try:
                self.wfile.write(data)
                self.wfile.flush()
            except OSError:
                return  # the router gave the answer up
            time.sleep(wait)
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_WR)
