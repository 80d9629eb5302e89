"""The Gate answers before a body ends (413, 401) only after reading the rest, bounded (issue #31):
a client still sending, whose connection then closes, reads the answer instead of a reset."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from zoo_agent.resident.wire.gate import Gate

KEY = "k3y"


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    import uvicorn

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    server = uvicorn.Server(uvicorn.Config(Gate(app, max_body=1 << 20, api_key=KEY), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[listener])), daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()


def _send_all_then_read(port: int, head: list[str], chunks: Iterator[bytes]) -> tuple[int, dict[str, str], bytes]:
    """A client that writes its whole body before it reads (urllib, http.client, curl): it sees
    the answer only if the server did not close on unread bytes (which resets the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(("\r\n".join(["POST /v1/completions HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *head]) + "\r\n\r\n").encode())
        for chunk in chunks:
            s.sendall(chunk)
        data = b""
        while piece := s.recv(65536):
            data += piece
    top, _, body = data.partition(b"\r\n\r\n")
    status, *lines = top.decode("latin-1").split("\r\n")
    return int(status.split()[1]), {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}, body


def _chunked(total: int, size: int = 64 << 10) -> Iterator[bytes]:
    for _ in range(total // size):
        yield f"{size:x}\r\n".encode() + b" " * size + b"\r\n"
    yield b"0\r\n\r\n"


def test_a_chunked_body_past_the_limit_gets_its_413_read(port: int) -> None:
    status, _, body = _send_all_then_read(port, [f"Authorization: Bearer {KEY}", "Transfer-Encoding: chunked"], _chunked(5 << 20))
    assert status == 413 and json.loads(body)["error"]["param"] == "body"


def test_a_declared_length_past_the_limit_gets_its_413_read(port: int) -> None:
    total = 3 << 20
    status, _, body = _send_all_then_read(port, [f"Authorization: Bearer {KEY}", f"Content-Length: {total}"], iter([b" " * total]))
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"


def test_an_unauthorized_body_gets_its_401_read(port: int) -> None:
    status, headers, _ = _send_all_then_read(port, ["Authorization: Bearer wrong", "Transfer-Encoding: chunked"], _chunked(2 << 20))
    assert status == 401 and headers["www-authenticate"] == "Bearer"


def test_a_body_that_does_not_end_is_not_read_forever(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the drain bound the answer says Connection: close and the connection closes."""
    import zoo_agent.resident.wire.gate as gate

    monkeypatch.setattr(gate, "DRAIN_BYTES", 1 << 20)
    sent, total = 0, 256 << 20
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        with pytest.raises(OSError):  # a broken pipe or a reset, once the server stopped reading
            for chunk in _chunked(total):
                s.sendall(chunk)
                sent += len(chunk)
    assert sent < total
