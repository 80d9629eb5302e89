"""Hostile client input against the router (issue #31): one request never stalls the host, and
whatever a client sends is answered with a 4xx naming the field or served, never a 500.

Real processes: one resident (router, two tiny-model workers, a route with a code rule) for
the module; each test leaves it serving."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.asgi import CHAT, ask
from tests.support.resident import Resident
from tests.support.world import World

pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")

pytestmark = pytest.mark.resident

ROUTE = {"rules": [{"tenant": "large", "when": {"code": True}}, {"tenant": "large", "when": {"keywords": ["explain"]}},
                   {"tenant": "small", "when": {"max_words": 12}}], "default": "large", "fallback": ["small"]}  # fmt: skip
MIB = 1 << 20
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def resident(tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, bytes]) -> Iterator[Resident]:
    world = World(tmp_path_factory.mktemp("router"))
    world.artifact("m", "v1", tiny)
    files = dict(tiny)
    files["config.json"] = tiny["config.json"].replace(b"{", b'{"_v": 2,', 1)
    world.artifact("m2", "v1", files)
    gen = {"generation": {"temperature": 0, "max_tokens": 4}}
    doc = {"models": world.models, "loras": {},
           "tenants": {"small": {"model": "m", **gen, "pinned": True}, "large": {"model": "m2", **gen, "pinned": True}},
           "routes": {"assistant": ROUTE}, "hosts": {"h": {"tenants": ["small", "large"], "routes": ["assistant"]}}}  # fmt: skip
    world.index.write_text(json.dumps(doc, indent=2))
    assert world.run("apply").exit_code == 0
    r = Resident(world, env={"WATCHDOG_USEC": "4000000"})
    try:
        r.notify.wait(lambda m: "READY" in m, timeout=180)
        yield r
    finally:
        r.stop()


def _chat(r: Resident, model: str = "assistant", text: str = "What is a zoo?", **kw: Any) -> Any:
    import httpx

    return httpx.post(r.url + "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": text}], **kw}, timeout=120)


def _serving(r: Resident) -> None:
    for model in ("assistant", "small", "large"):
        answer = _chat(r, model)
        assert answer.status_code == 200, answer.text


# -- one request never stalls the router's loop ----------------------------------------------------


#: Each a body of about 1 MiB (JSON writes a newline or a tab in two bytes).
PATHOLOGICAL = {"newlines": "\n" * (MIB // 2 - 512), "blank lines of tabs": ("\t" * 1000 + "\n") * (MIB // 2002 - 1),
                "a brace, then blanks": "{" + " " * (MIB - 1024) + "x"}  # fmt: skip


def test_pathological_1_mib_messages_through_a_route_leave_health_answering(resident: Resident) -> None:
    """The route's rules ran on the router's loop in time quadratic in the newlines: 52 kB held
    /health for tens of seconds (1 MiB: hours), and the watchdog, fed by that loop, killed the host."""
    import httpx

    stop, slow, answers = threading.Event(), [], []

    def poll() -> None:
        with httpx.Client() as http:
            while not stop.is_set():
                try:
                    http.get(resident.url + "/health", timeout=2.0).raise_for_status()  # a liveness bound, not a measurement
                except httpx.HTTPError as exc:
                    slow.append(repr(exc))
                time.sleep(0.1)

    def ask(text: str) -> None:
        body = json.dumps({"model": "assistant", "messages": [{"role": "user", "content": text}], "max_tokens": 1}).encode()
        assert MIB - 8192 < len(body) <= MIB
        answers.append(httpx.post(resident.url + "/v1/chat/completions", content=body, headers=JSON, timeout=300))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        askers = [threading.Thread(target=ask, args=(text,)) for text in PATHOLOGICAL.values()]
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join(300)
    finally:
        stop.set()
        poller.join(10)
    assert not slow, slow[:3]
    assert len(answers) == len(PATHOLOGICAL)
    for answer in answers:
        # each gets an answer (the tiny models' context refuses a prompt this long), saying which tenant gave it
        assert answer.status_code < 500 and answer.json()["x_zoo"]["route"]["route"] == "assistant", answer.text[:300]
    assert resident.proc.poll() is None
    _serving(resident)


# -- 4xx, never a 500 --------------------------------------------------------------------------------


def test_deep_json_is_a_400_naming_the_body(resident: Resident) -> None:
    import httpx

    for model in ("assistant", "small"):
        for deep in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000, b"[" * 65 + b"]" * 65):
            body = json.dumps({"model": model})[:-1].encode() + b', "messages": ' + deep + b"}"
            answer = httpx.post(resident.url + "/v1/chat/completions", content=body, headers=JSON, timeout=60)
            assert answer.status_code == 400, (model, answer.status_code, answer.text[:300])
            error = answer.json()["error"]
            assert error["param"] == "body" and "nests deeper than 64 levels" in error["message"], error
    _serving(resident)


def test_a_number_json_cannot_carry_is_a_400_naming_the_body_not_a_refusal_of_infinity(resident: Resident) -> None:
    """``1e999`` reads as infinity; re-encoded for the route's tenant it went out as ``Infinity``,
    and the worker refused a body saying 'Infinity is not a JSON number', which the client never sent."""
    import httpx

    body = json.dumps({"model": "assistant", "messages": [{"role": "user", "content": "Hi"}]})[:-1].encode() + b', "x": [1e999]}'
    answer = httpx.post(resident.url + "/v1/chat/completions", content=body, headers=JSON, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "body", answer.text
    assert "1e999" in answer.json()["error"]["message"] and "Infinity" not in answer.text
    _serving(resident)


@pytest.mark.parametrize("sid", ["a%00b", "a%0d%0aSet-Cookie:%20x", "a%7f", "%2e%2e", "a%2fb", "%ff", "a%20b"])
def test_a_session_path_with_control_characters_is_a_400_naming_the_session(resident: Resident, sid: str) -> None:
    import httpx

    for method in ("GET", "DELETE"):
        for model in ("small", "assistant"):
            answer = httpx.request(method, f"{resident.url}/v1/sessions/{sid}?model={model}", timeout=60)
            assert answer.status_code == 400, (method, model, answer.status_code, answer.text[:300])
            assert answer.json()["error"]["param"] == "session"
    assert httpx.get(f"{resident.url}/v1/sessions/fine?model=small", timeout=60).status_code == 404  # a valid id that has no session
    _serving(resident)


def test_a_body_not_sent_as_json_or_by_another_method_is_refused_before_it_is_routed(resident: Resident) -> None:
    """A browser's cross-site POST carries no JSON Content-Type; the router routed it (and would load
    a tenant for it) and the worker answered a 400 naming nothing. A route forwarded PUT as POST."""
    import httpx

    body = json.dumps({"model": "assistant", "messages": [{"role": "user", "content": "Hi"}]}).encode()
    for headers in ({}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}):
        answer = httpx.post(resident.url + "/v1/chat/completions", content=body, headers=headers, timeout=60)
        assert answer.status_code == 415 and answer.json()["error"]["param"] == "content-type", answer.text
    for method in ("PUT", "GET", "DELETE"):
        answer = httpx.request(method, resident.url + "/v1/chat/completions", content=body, headers=JSON, timeout=60)
        assert answer.status_code == 405 and answer.json()["error"]["param"] == "method", (method, answer.text)
    _serving(resident)


def test_an_encoded_path_is_a_404_and_a_head_over_16_kib_a_431_each_an_openai_error(resident: Resident) -> None:
    """The router (and behind it the worker) served ``/v1/chat%2fcompletions`` as ``/v1/chat/completions``, and took
    40 KiB of headers that arrived in one read (h11 limits only a head still arriving)."""
    import http.client

    body = json.dumps({"model": "small", "messages": [{"role": "user", "content": "Hi"}]})
    for path, head, status in (("/v1/chat%2fcompletions", {}, 404), ("/v1%2Fchat/completions", {}, 404),
                               ("/v1/chat/completions", {f"X-Pad-{i}": "a" * 1000 for i in range(40)}, 431)):  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", resident.port, timeout=60)
        try:
            conn.request("POST", path, body, {**JSON, **head})
            answer = conn.getresponse()
            error = json.loads(answer.read())["error"]
        finally:
            conn.close()
        assert answer.status == status and error["type"] == "invalid_request_error", (path, error)
        assert error["param"] == ("headers" if status == 431 else None)
    _serving(resident)


def test_a_chunked_body_past_the_limit_gets_its_413_read_through_the_router(resident: Resident) -> None:
    """A client that writes its whole body before reading (``Connection: close``: urllib, curl)."""
    with socket.create_connection(("127.0.0.1", resident.port), timeout=60) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(80):  # 5 MiB
            s.sendall(f"{64 << 10:x}\r\n".encode() + b" " * (64 << 10) + b"\r\n")
        s.sendall(b"0\r\n\r\n")
        data = b""
        while piece := s.recv(65536):
            data += piece
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["param"] == "body"
    _serving(resident)


# -- every answer of a route says which tenant gave it --------------------------------------------------


def test_a_routed_stream_that_ends_in_an_error_event_says_who_answered(resident: Resident) -> None:
    import httpx

    lines: list[str] = []

    def read() -> None:
        body = {"model": "assistant", "messages": [{"role": "user", "content": "explain " * 20}], "stream": True, "max_tokens": 400, "ignore_eos": True}
        with httpx.stream("POST", resident.url + "/v1/chat/completions", json=body, timeout=120) as answer:
            lines.extend(answer.iter_lines())

    info = resident.world.root / "resident/tenants/large/model-info.json"
    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 60
    while not any('"content"' in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(json.loads(info.read_text())["pid"]), signal.SIGKILL)  # after its first token: no other tenant may take over
    reader.join(60)
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert "error" in events[-1], lines[-3:]
    assert events[-1]["x_zoo"]["route"] == {"route": "assistant", "tenant": "large", "rule": "keywords:explain"}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the killed worker comes back (it is pinned)
        with contextlib.suppress(httpx.HTTPError, KeyError):
            if httpx.get(resident.url + "/health", timeout=5).json()["tenants"]["large"]["state"] == "serving" and _chat(resident, "large").status_code == 200:
                break
        time.sleep(0.5)
    _serving(resident)


# -- the worker's own parse: the same bounded reader ------------------------------------------------


def test_the_worker_reads_bodies_with_the_bounded_reader(app: Any) -> None:
    """A body the router let through (a peer's, or one sent on the worker's socket) meets the same
    reader in the worker: one line naming ``body`` and why, where FastAPI said only that parsing failed."""
    deep = json.dumps({"model": "t"})[:-1].encode() + b', "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    shallow_but_past_64 = json.dumps({**CHAT, "extra": json.loads("[" * 65 + "]" * 65)}).encode()
    digits = json.dumps(CHAT)[:-1].encode() + b', "seed": ' + b"9" * 5000 + b"}"
    for body, says in ((deep, "nests deeper than 64 levels"), (shallow_but_past_64, "nests deeper than 64 levels"),
                       (b"\xff{}", "not UTF-8"), (digits, "too many digits")):  # fmt: skip
        for path in ("/v1/chat/completions", "/v1/completions"):
            (answer,) = ask(app, (path, body))
            assert answer.status_code == 400, (path, says, answer.text[:300])
            error = answer.json()["error"]
            assert error["param"] == "body" and says in error["message"] and error["message"].startswith("body: "), error
    (fine,) = ask(app, ("/v1/chat/completions", CHAT))
    assert fine.status_code == 200


def test_the_worker_names_the_body_when_it_is_not_sent_as_json(app: Any) -> None:
    """FastAPI does not read a body without Content-Type: application/json; its 400 named nothing (': Input should be …')."""
    import asyncio

    import httpx

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://zoo", timeout=60) as client:
            return [await client.post("/v1/chat/completions", content=json.dumps(CHAT).encode(), headers=headers)
                    for headers in ({}, {"content-type": "text/plain"})]  # fmt: skip

    for answer in asyncio.run(run()):
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "body", answer.text
        assert "Content-Type: application/json" in answer.json()["error"]["message"]
