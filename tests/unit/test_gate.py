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
        """Routes as the router's and the workers' do: by the path in the scope."""
        known = scope["path"] in ("/v1/completions", "/v1/chat/completions")
        await send({"type": "http.response.start", "status": 200 if known else 404, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok" if known else b"no"})

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


def _post(port: int, path: str, head: list[str]) -> tuple[int, bytes]:
    """One POST of an empty JSON object, its head written in one piece (so the server reads it whole)."""
    request = "\r\n".join([f"POST {path} HTTP/1.1", "Host: x", f"Authorization: Bearer {KEY}", "Content-Length: 2", "Connection: close", *head])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall((request + "\r\n\r\n{}").encode())
        data = b""
        while piece := s.recv(65536):
            data += piece
    top, _, body = data.partition(b"\r\n\r\n")
    return int(top.split()[1]), body


@pytest.mark.parametrize("path", ["/v1/chat%2fcompletions", "/v1/chat%2Fcompletions", "/v1/%63ompletions", "/%76%31/completions"])
def test_a_path_is_matched_as_sent_so_an_encoded_one_is_a_404(port: int, path: str) -> None:
    """``/v1/chat%2fcompletions`` was served as ``/v1/chat/completions``: the apps matched the decoded path. A proxy
    in front that allows or denies by path sees the encoded one; what it let through must not become another route."""
    assert _post(port, path, [])[0] == 404
    assert _post(port, "/v1/chat/completions", []) == (200, b"ok")


def test_a_head_over_16_kib_is_a_431_naming_the_headers(port: int) -> None:
    """h11 limits a head only while it is incomplete: 40 KiB of headers arriving in one read were accepted."""
    status, body = _post(port, "/v1/completions", [f"X-Pad-{i}: {'a' * 1000}" for i in range(40)])
    error = json.loads(body)["error"]
    assert status == 431 and error["param"] == "headers" and error["code"] == "headers_too_large" and "16384" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert _post(port, "/v1/completions", [f"X-Pad-{i}: {'a' * 1000}" for i in range(14)]) == (200, b"ok")
