"""`zoo-agent fleet status` against hosts that misbehave (issue #31): a server that trickles
one byte at a time, one that never ends its body, a /health 100,000 levels deep, an answer
that writes terminal escapes, and endpoints that `validate` must refuse. Fake servers on
127.0.0.1 only; no resident needed."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from zoo_agent.cli.main import cli
from zoo_agent.index.load import load_index
from zoo_agent.resident.router.peers import tenant_digest

Serve = Callable[[socket.socket, bytes], None]


class FakeHost:
    """A TCP server on 127.0.0.1 that hands each connection and its request head to ``serve``."""

    def __init__(self, serve: Serve) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.serve = serve
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            try:
                self.serve(conn, head)
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def answer(body: bytes, status: str = "200 OK") -> Serve:
    def serve(conn: socket.socket, head: bytes) -> None:
        conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    return serve


def trickle(stop: threading.Event, head: bytes) -> Serve:
    """``head``, then one more byte every 0.2 s for as long as the client reads: every socket
    read succeeds well within any timeout, and the answer never ends."""
    def serve(conn: socket.socket, request: bytes) -> None:
        conn.sendall(head)
        while not stop.wait(0.2):
            conn.sendall(b" " if head.endswith(b"\r\n\r\n") else b"a")
    return serve


SLOW_BODY = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
SLOW_HEAD = b"HTTP/1.1 200 OK\r\nX-Slow: "
MODEL = {"version": "1", "source": {"type": "ollama", "name": "m:1", "digest": "sha256:" + "ab12" * 16}, "format": "ollama", "license": "MIT"}


@pytest.fixture
def hosts() -> Iterator[Callable[[Serve], FakeHost]]:
    made: list[FakeHost] = []

    def make(serve: Serve) -> FakeHost:
        made.append(FakeHost(serve))
        return made[-1]

    yield make
    for host in made:
        host.close()


def _index(tmp_path: Path, endpoints: dict[str, str]) -> Path:
    """Every host serves tenant t (an Ollama model: no files to declare) at its endpoint."""
    doc = {"models": {"m": MODEL}, "tenants": {"t": {"model": "m", "backend": "ollama"}},
           "hosts": {hid: {"resident": "t", "endpoint": url} for hid, url in endpoints.items()}}  # fmt: skip
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(doc))
    return path


def _one_tenant(tmp_path: Path, url: str) -> Path:
    return _index(tmp_path, {"a": url})


def _status(*args: str, within: float = 60) -> Result:
    """The command in-process, in a thread of its own: on a hang the test fails instead of hanging."""
    done: list[Result] = []
    thread = threading.Thread(target=lambda: done.append(CliRunner().invoke(cli, ["fleet", "status", *args])), daemon=True)
    thread.start()
    thread.join(within)
    assert done, f"fleet status did not return within {within}s"
    return done[0]


def test_a_trickling_host_is_given_up_after_the_timeout(tmp_path: Path, hosts: Callable[[Serve], FakeHost]) -> None:
    stop = threading.Event()
    try:
        body, head = hosts(trickle(stop, SLOW_BODY)), hosts(trickle(stop, SLOW_HEAD))
        card: dict[str, Any] = {"id": "t", "root": "m@1"}
        fine = hosts(lambda conn, request: answer(json.dumps({"object": "list", "data": [card]}).encode())(conn, request))
        index = _index(tmp_path, {"body": body.url, "head": head.url, "fine": fine.url})
        card["x_zoo"] = {"model": "m@1", "digest": tenant_digest(load_index(index), "t")}
        started = time.monotonic()
        result = _status("--index", str(index), "--timeout", "1", "--json")
        assert time.monotonic() - started < 30  # a liveness bound, not a timing claim
        assert result.exit_code == 1, result.output
        rows = {r["host"]: (r["state"], r["error"]) for r in json.loads(result.stdout)["tenants"]}
        late = ("unreachable", "timed out: no whole answer within 1s")
        assert rows == {"body": late, "head": late, "fine": ("ok", None)}
        table = _status("--index", str(index), "--timeout", "0.5")
        assert table.output.splitlines()[1].split(None, 4) == ["body", "t", "-", "m@1", "unreachable (timed out: no whole answer within 0.5s)"]
    finally:
        stop.set()


@pytest.mark.parametrize(("body", "reason"), [
    (b"[" * 100_000 + b"]" * 100_000, "HTTP 200, not a resident's JSON answer (nests deeper than 64 levels)"),
    (b'{"state": NaN}', "HTTP 200, not a resident's JSON answer (not JSON (NaN is not a JSON number))"),
    (b"{\"state\": \"\x80\"}", "HTTP 200, not a resident's JSON answer (not UTF-8 (byte at offset 11))"),
    (b" " * ((4 << 20) + 1), "HTTP 200, not a resident's JSON answer (larger than 4194304 bytes)"),
])  # fmt: skip
def test_a_hostile_health_answer_is_a_row_not_a_traceback(tmp_path: Path, hosts: Callable[[Serve], FakeHost], body: bytes, reason: str) -> None:
    host = hosts(answer(body))
    result = _status("--index", str(_one_tenant(tmp_path, host.url)), "--json")
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit), result.output
    (row,) = json.loads(result.stdout)["tenants"]
    assert (row["state"], row["error"]) == ("unreachable", reason)


def test_a_hosts_words_cannot_write_to_the_terminal(tmp_path: Path, hosts: Callable[[Serve], FakeHost]) -> None:
    def serve(conn: socket.socket, head: bytes) -> None:
        if head.startswith(b"GET /health"):
            answer(b'{"state": "ready"}')(conn, head)
        else:
            answer(json.dumps({"error": {"message": "\x1b[2J\x1b]0;owned\x07\nsecond line" + "x" * 500}}).encode(), "403 Forbidden")(conn, head)

    host = hosts(serve)
    result = _status("--index", str(_one_tenant(tmp_path, host.url)))
    lines = result.output.splitlines()
    assert result.exit_code == 1 and len(lines) == 3, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert lines[1].endswith("unreachable (/v1/models answered HTTP 403: \\x1b[2J\\x1b]0;owned\\x07\\nsecond line" + "x" * 174 + "…)")


@pytest.mark.parametrize(("endpoint", "message"), [
    ("http://bücher.example:8000", "the host 'bücher.example' is not ASCII; write it in its xn-- form ('xn--bcher-kva.example')"),
    ("http://" + "a" * 64 + ".lan:8000", f"the label '{'a' * 64}' is 64 characters; a DNS label has at most 63"),
    ("http://a.lan\x00:8000", "must not contain control characters ('http://a.lan\\x00:8000')"),
    ("http://a.lan:8000\x7f", "must not contain control characters ('http://a.lan:8000\\x7f')"),
    ("http://a..lan:8000", "the host 'a..lan' has an empty label; write a DNS name such as 'sprout.lan'"),
    ("http://a_b!.lan", "the host 'a_b!.lan' holds '!'; a host name is letters, digits, '-' and '.' (or an IP address)"),
    ("http://-a.lan", "the label '-a' starts or ends with '-'; a DNS label does not"),
    ("http://[::1:8000", "is not a URL (Invalid IPv6 URL): 'http://[::1:8000'"),
    ("http://[fe80::zz]:80", "is not a URL ('fe80::zz' does not appear to be an IPv4 or IPv6 address): 'http://[fe80::zz]:80'"),
    ("http://" + "abc." * 64 + "lan", "the host is 259 characters; a DNS name has at most 253"),
    ("http://999.1.1.1:80", "the host '999.1.1.1' is not an IPv4 address (each part is 0-255)"),
])  # fmt: skip
def test_validate_refuses_an_endpoint_fleet_status_could_not_ask(tmp_path: Path, endpoint: str, message: str) -> None:
    index = _index(tmp_path, {"a": endpoint})
    result = CliRunner().invoke(cli, ["validate", str(index)])
    assert (result.exit_code, result.stderr) == (2, f"{index}: /hosts/a/endpoint: {message}\n")
    status = _status("--index", str(index))
    assert (status.exit_code, status.stderr) == (2, result.stderr)  # the same one line, never a traceback


@pytest.mark.parametrize("endpoint", ["http://xn--bcher-kva.example:8000", "http://" + "a" * 63 + ".lan", "http://10.0.0.1", "http://[2001:db8::1]:8000",
                                      "https://sprout.lan.", "http://SPROUT.lan:1", "http://under_score.lan"])  # fmt: skip
def test_validate_accepts_ordinary_endpoints(tmp_path: Path, endpoint: str) -> None:
    result = CliRunner().invoke(cli, ["validate", str(_index(tmp_path, {"a": endpoint}))])
    assert result.exit_code == 0, result.output


# -- the other commands that read a resident's answers: `resident status` and `chat` ----------------


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(("status", "body", "message"), [
    ("200 OK", DEEP, "/health: not a resident's answer (nests deeper than 64 levels)"),
    ("503 Service Unavailable", DEEP, "/health: not a resident's answer (nests deeper than 64 levels)"),
    ("200 OK", b"[1, 2]", "/health: not a resident's answer (not a JSON object)"),
])  # fmt: skip
def test_resident_status_reads_health_through_the_bounded_reader(tmp_path: Path, hosts: Callable[[Serve], FakeHost],
                                                                 status: str, body: bytes, message: str) -> None:  # fmt: skip
    host = hosts(answer(body, status))
    result = CliRunner().invoke(cli, ["resident", "--root", str(tmp_path / "zoo"), "status", "--url", host.url])
    assert (result.exit_code, result.stderr) == (1, f"{host.url}{message}\n")


def test_resident_status_prints_odd_fields_without_a_traceback_or_an_escape(tmp_path: Path, hosts: Callable[[Serve], FakeHost]) -> None:
    health = {"state": "ready\x1b[2J", "status": "1 tenant", "tenants": {
        "a": {"state": "serving", "model": "m", "version": "1", "running": "many", "idle_seconds": 10**400, "footprint": None},
        "b": "not an object", "c": {"error": "bad\nline"}}}  # fmt: skip
    host = hosts(answer(json.dumps(health).encode()))
    result = CliRunner().invoke(cli, ["resident", "--root", str(tmp_path / "zoo"), "status", "--url", host.url])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "ready\\x1b[2J: 1 tenant" and len(lines) == 3
    assert lines[1].split() == ["a", "serving", "m@1", "0", "running", "0", "waiting", "idle", "-", "0.0", "MiB"]
    assert lines[2].split() == ["c", "?", "-", "0", "running", "0", "waiting", "idle", "-", "0.0", "MiB", "bad\\nline"]


@pytest.mark.parametrize(("body", "message"), [
    (DEEP, "/v1/models: not a resident's answer (nests deeper than 64 levels)"),
    (b'{"data": 5}', "/v1/models: not a resident's answer (no 'data' list)"),
])  # fmt: skip
def test_chat_reads_answers_through_the_bounded_reader(hosts: Callable[[Serve], FakeHost], body: bytes, message: str) -> None:
    host = hosts(answer(body))
    result = CliRunner().invoke(cli, ["chat", "--url", host.url], input="/quit\n")
    assert (result.exit_code, result.stderr) == (1, f"{host.url}{message}\n")


def test_a_card_with_a_field_of_the_wrong_type_is_that_hosts_error_naming_the_field(tmp_path: Path, hosts: Callable[[Serve], FakeHost]) -> None:
    """Typed documents (issue #32): a card whose digest is a number is no resident's answer; a newer field is no fault."""
    cards: dict[str, dict[str, Any]] = {}

    def serving(name: str) -> Serve:
        return lambda conn, head: answer(json.dumps({"object": "list", "data": [cards[name]]}).encode())(conn, head)

    good, bad = hosts(serving("good")), hosts(serving("bad"))
    index = _index(tmp_path, {"good": good.url, "bad": bad.url})
    digest = tenant_digest(load_index(index), "t")
    cards["good"] = {"id": "t", "root": "m@1", "x_zoo": {"model": "m@1", "digest": digest, "from_the_future": [1]}, "max_model_len": 9}
    cards["bad"] = {"id": "t", "root": "m@1", "x_zoo": {"model": "m@1", "digest": 5}}
    result = _status("--index", str(index), "--json")
    rows = {r["host"]: (r["state"], r["error"]) for r in json.loads(result.stdout)["tenants"]}
    assert rows == {"good": ("ok", None), "bad": ("unreachable", "not a resident's answer (/v1/models: /data/0/x_zoo/digest: expected a string, got a number)")}


def test_resident_status_names_what_it_could_not_read(tmp_path: Path, hosts: Callable[[Serve], FakeHost]) -> None:
    health = {"state": "ready", "status": "1 tenant", "tenants": {"a": {"state": "serving", "running": "many", "gpu": {"util": 1}}}}
    host = hosts(answer(json.dumps(health).encode()))
    result = CliRunner().invoke(cli, ["resident", "--root", str(tmp_path / "zoo"), "status", "--url", host.url])
    assert result.exit_code == 0 and result.stdout.splitlines()[1].split()[:4] == ["a", "serving", "-", "0"]
    assert result.stderr == f"{host.url}/health: /tenants/a/running: expected an integer, got a string; not shown\n"
