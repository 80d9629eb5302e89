"""An OpenAI-compatible server that says whatever a test wants it to, for tests only (issue #36): the
remote a remote tenant points at (``backend: "openai"``).

It lists ``models`` at ``<prefix>/models`` and answers every ``POST`` with ``answer``: by default
a well-formed completion (or, for ``"stream": true``, its events), else raw bytes written to the
socket as they are (a redirect, a gzip body, JSON nested 100,000 levels, an endless stream: see
tests/support/peerserver.py's helpers). Every request's path, headers and body is kept
(``gets``, ``posts``), so a test sees which key went out and that nothing of the client's did.
``stop`` and ``start`` again on the same port: the remote going away and coming back.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.peerserver import good_json, good_sse, http

__all__ = ["RemoteStandIn"]

Answer = bytes | Callable[[dict[str, Any]], bytes | Iterable[tuple[bytes, float]]]


def _default(body: dict[str, Any]) -> bytes:
    return good_sse() if body.get("stream") else good_json()


class RemoteStandIn:
    """``url`` is its base URL (``http://127.0.0.1:PORT/v1``); ``answer``, ``models`` and ``status`` (of
    its ``/models``) may change at any time."""

    def __init__(self, models: list[str], port: int = 0, prefix: str = "/v1") -> None:
        self.models, self.prefix, self.port = models, prefix, port
        self.answer: Answer = _default
        self.models_status = "200 OK"
        self.gets: list[tuple[str, dict[str, str]]] = []
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    def start(self) -> RemoteStandIn:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        server.daemon_threads = True
        server.stand_in = self  # type: ignore[attr-defined]
        self.port = int(server.server_address[1])
        self.server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Gone: its port refuses connections until ``start`` again."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    @property
    def stand_in(self) -> RemoteStandIn:
        return self.server.stand_in  # type: ignore[attr-defined,no-any-return]

    def log_message(self, *args: Any) -> None:
        pass

    def _headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items()}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        me = self.stand_in
        me.gets.append((self.path, self._headers()))
        if self.path == me.prefix + "/models":
            doc = {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "stand-in"} for m in me.models]}
            self.wfile.write(http(me.models_status, json.dumps(doc).encode(), {"Content-Type": "application/json"}))
        else:
            self.wfile.write(http("404 Not Found", b"{}", {"Content-Type": "application/json"}))
        self.close_connection = True

    def do_POST(self) -> None:  # noqa: N802
        me = self.stand_in
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        me.posts.append((self.path, self._headers(), body))
        answer = me.answer
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
