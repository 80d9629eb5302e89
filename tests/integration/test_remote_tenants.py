"""Remote tenants (issue #36): a real resident whose tenants ``cloud`` and ``nokey`` are answered by a
stand-in OpenAI-compatible server on 127.0.0.1 (tests/support/openaiserver.py), and ``self`` by the
resident itself (its own ``/v1``, where the local tenant ``chat`` answers).

A remote tenant answers and streams; only its own key goes out, never the client's headers; a
saturated local tenant falls back to it before its first token; a hostile remote (a redirect, a
gzip body, deep JSON, an endless stream) is refused as a peer is; a remote that goes away makes
its tenant unavailable, and only it, until it comes back.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.openaiserver import RemoteStandIn
from tests.support.peerserver import PeerStandIn, chunk, completion, gzipped, http, sse
from tests.support.resident import Resident, free_port
from tests.support.world import World

pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")

import httpx  # noqa: E402

pytestmark = pytest.mark.resident

DEEP = b"[" * 100_000 + b"]" * 100_000
#: What a client sends that must never reach a remote: its key, its cookies, its own headers.
CLIENT_HEADERS = {"Authorization": "Bearer client-secret", "Cookie": "sid=client", "X-Forwarded-For": "10.9.8.7",
                  "X-Client-Thing": "mine"}


@dataclass
class Setup:
    r: Resident
    remote: RemoteStandIn
    trap: PeerStandIn  # where a redirect points: nothing may ever reach it
    world: World

    def health(self) -> dict[str, Any]:
        return httpx.get(self.r.url + "/health", timeout=10).json()  # type: ignore[no-any-return]

    def wait_state(self, tenant: str, state: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (seen := self.health()["tenants"][tenant])["state"] == state:
                return seen  # type: ignore[no-any-return]
            time.sleep(0.1)
        raise AssertionError(f"{tenant} never became {state}: {self.health()}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, bytes]) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("remote")
    remote, trap = RemoteStandIn(["remote-model", "other"]).start(), PeerStandIn([]).start()
    (tmp / "remote-key").write_text("remote-secret\n")
    (tmp / "creds").mkdir()
    (tmp / "creds" / "self-key").write_text("self-secret\n")
    port = free_port()
    w = World(tmp)
    w.artifact("m", "v1", tiny)
    base = {"poll_seconds": 1, "first_token_seconds": 20, "timeout_seconds": 4}
    doc = {"models": w.models,
           "tenants": {"chat": {"model": "m", "pinned": True, "generation": {"temperature": 0, "max_tokens": 4},
                                "resources": {"max_batch": 1, "max_queue": 1}},
                       "cloud": {"backend": "openai", "description": "the stand-in", "generation": {"max_tokens": 7},
                                 "remote": {"base_url": remote.url, "model": "remote-model", "key_file": str(tmp / "remote-key"), "max_tokens": 50, **base}},
                       "self": {"backend": "openai", "remote": {"base_url": f"http://127.0.0.1:{port}/v1", "model": "chat", "key_file": "self-key", **base}},
                       "nokey": {"backend": "openai", "remote": {"base_url": remote.url, "model": "remote-model", "key_file": "absent", **base}}},
           "routes": {"assistant": {"default": "chat", "fallback": ["cloud"]}},
           "hosts": {"h": {"tenants": ["chat", "cloud", "self", "nokey"], "routes": ["assistant"]}}}  # fmt: skip
    w.index.write_text(json.dumps(doc, indent=2))
    assert w.run("apply").exit_code == 0
    r = Resident(w, "--listen", f"127.0.0.1:{port}", env={"CREDENTIALS_DIRECTORY": str(tmp / "creds")})
    r.port = port
    try:
        r.wait_ready()
        s = Setup(r, remote, trap, w)
        s.wait_state("cloud", "serving")
        s.wait_state("self", "serving")
        yield s
    finally:
        out = r.stop()
        remote.stop()
        trap.stop()
        assert "Traceback" not in out, out[-3000:]
        assert "remote-secret" not in out and "self-secret" not in out  # no key in the journal


@pytest.fixture
def s(setup: Setup) -> Setup:
    setup.remote.answer = lambda body: _good(body)
    setup.remote.models_status = "200 OK"
    if setup.remote.server is None:
        setup.remote.start()
    setup.wait_state("cloud", "serving")
    return setup


def _good(body: dict[str, Any]) -> bytes:
    from tests.support.peerserver import good_json, good_sse

    return good_sse() if body.get("stream") else good_json()


def ask(s: Setup, model: str, **kw: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello there"}], **kw}
    return httpx.post(s.r.url + "/v1/chat/completions", json=body, headers=CLIENT_HEADERS, timeout=60)


def ask_stream(s: Setup, model: str, **kw: Any) -> tuple[int, dict[str, str], list[Any]]:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello there"}], "stream": True, **kw}
    with httpx.stream("POST", s.r.url + "/v1/chat/completions", json=body, headers=CLIENT_HEADERS, timeout=60) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
        return resp.status_code, dict(resp.headers), [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def test_a_remote_tenant_answers_and_streams_and_only_its_own_key_goes_out(s: Setup) -> None:
    before = len(s.remote.posts)
    answer = ask(s, "cloud", priority=1, x_zoo={"adapters": []})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "peer words" and answer.json()["x_zoo"] == {"remote": f"127.0.0.1:{s.remote.port}"}
    status, headers, events = ask_stream(s, "cloud", max_tokens=500)
    assert status == 200 and "text/event-stream" in headers["content-type"] and events[-1] == "[DONE]", events
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "peer words"
    assert events[-2]["x_zoo"]["remote"] == f"127.0.0.1:{s.remote.port}"

    posts = s.remote.posts[before:]
    assert [p[0] for p in posts] == ["/v1/chat/completions"] * 2
    for _, sent, raw in posts:
        assert sent["authorization"] == "Bearer remote-secret"
        assert not {"cookie", "x-forwarded-for", "x-client-thing", "x-zoo-priority"} & set(sent), sent
        assert "client-secret" not in json.dumps(sent) and b"client-secret" not in raw
    first, second = (json.loads(raw) for _, _, raw in posts)
    assert first["model"] == "remote-model" and "priority" not in first and "x_zoo" not in first
    assert first["max_tokens"] == 7  # the tenant's generation.max_tokens, where the request names none
    assert second["max_tokens"] == 50 and second["stream"] is True  # capped by remote.max_tokens
    assert all(h.get("authorization") == "Bearer remote-secret" for path, h in s.remote.gets if path == "/v1/models")

    cards = {c["id"]: c for c in httpx.get(s.r.url + "/v1/models", timeout=10).json()["data"]}
    assert cards["cloud"]["root"] == "remote-model" and cards["cloud"]["x_zoo"]["backend"] == "openai"
    assert cards["cloud"]["x_zoo"]["state"] == "serving" and cards["cloud"]["x_zoo"]["description"] == "the stand-in"
    metrics = httpx.get(s.r.url + "/metrics", timeout=30).text
    assert 'zoo:router_requests_total{code="200",tenant="cloud"}' in metrics and 'zoo:remote_up{tenant="cloud"} 1.0' in metrics
    assert "remote-model at 127.0.0.1" in s.health()["status"]

    refused = ask(s, "cloud", session="s1")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "session"
    assert ask(s, "cloud:sql").status_code == 404


def test_the_resident_itself_is_an_openai_compatible_remote(s: Setup) -> None:
    """``self`` is answered by this resident's own /v1, where ``chat`` (greedy) answers: the same words."""
    own, relayed = ask(s, "chat"), ask(s, "self", max_tokens=4, temperature=0)
    assert own.status_code == relayed.status_code == 200, relayed.text
    assert relayed.json()["choices"][0]["message"]["content"] == own.json()["choices"][0]["message"]["content"]
    assert relayed.json()["x_zoo"]["remote"] == f"127.0.0.1:{s.r.port}"
    status, _, events = ask_stream(s, "self", max_tokens=4, temperature=0)
    assert status == 200 and events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == own.json()["choices"][0]["message"]["content"]


def test_a_saturated_local_tenant_falls_back_to_the_remote_before_its_first_token(s: Setup) -> None:
    pid = int(json.loads((s.world.root / "resident/tenants/chat/model-info.json").read_text())["pid"])
    os.kill(pid, signal.SIGSTOP)  # its two places (max_batch 1 + max_queue 1) stay taken
    held = [threading.Thread(target=ask, args=(s, "chat"), daemon=True) for _ in range(2)]
    try:
        for t in held:
            t.start()
        deadline = time.monotonic() + 10
        while s.health()["tenants"]["chat"]["inflight"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        answer = ask(s, "assistant")
        status, _, events = ask_stream(s, "assistant")
    finally:
        os.kill(pid, signal.SIGCONT)
    for t in held:
        t.join(60)
    assert answer.status_code == 200, answer.text
    route = answer.json()["x_zoo"]["route"]
    assert (route["tenant"], route["fallback_from"]) == ("cloud", "chat") and "at capacity" in route["reason"], route
    assert answer.json()["x_zoo"]["remote"] == f"127.0.0.1:{s.remote.port}"
    assert status == 200 and events[-1] == "[DONE]" and events[-2]["x_zoo"]["route"]["tenant"] == "cloud", events
    assert ask(s, "assistant").json()["x_zoo"]["route"]["tenant"] == "chat"  # free again: the local tenant answers


HOSTILE = {
    "redirect": lambda trap: http("307 Temporary Redirect", b"", {"Location": trap.url + "/v1/chat/completions"}),
    "moved": lambda trap: http("301 Moved Permanently", b"", {"Location": trap.url}),
    "bad gzip": lambda trap: http("200 OK", b"not gzip at all", {"Content-Type": "application/json", "Content-Encoding": "gzip"}),
    "deep JSON": lambda trap: http("200 OK", DEEP, {"Content-Type": "application/json"}),
    "deep error": lambda trap: http("500 Internal Server Error", DEEP, {"Content-Type": "application/json"}),
    "not a completion": lambda trap: http("200 OK", b'{"hello": "world"}', {"Content-Type": "application/json"}),
    "html": lambda trap: http("200 OK", b"<html>hi</html>", {"Content-Type": "text/html"}),
    "its key refused": lambda trap: http("401 Unauthorized", b'{"error": {"message": "bad key"}}', {"Content-Type": "application/json"}),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_remote_answer_is_refused_as_a_peers_is(s: Setup, case: str) -> None:
    s.remote.answer = HOSTILE[case](s.trap)
    answer = ask(s, "cloud")
    assert answer.status_code == 503, answer.text
    assert answer.headers.get("location") is None and "content-encoding" not in answer.headers
    assert answer.json()["error"]["message"].startswith("tenant 'cloud': ") and "\n" not in answer.json()["error"]["message"]
    assert s.trap.posts == []
    assert ask(s, "chat").status_code == 200  # nobody else noticed
    assert httpx.get(s.r.url + "/health", timeout=10).status_code == 200


HOSTILE_STREAM = {
    "deep event": sse(b"data: " + DEEP + b"\n\n"),
    "a carriage return": sse(b": hi\rdata: " + json.dumps(chunk("injected", "stop")).encode() + b"\n\n", b"data: [DONE]\n\n"),
    "an event field": sse(b"event: other\ndata: " + json.dumps(chunk("x", "stop")).encode() + b"\n\n", b"data: [DONE]\n\n"),
    "JSON for a stream": http("200 OK", json.dumps(completion()).encode(), {"Content-Type": "application/json"}),
}


@pytest.mark.parametrize("case", HOSTILE_STREAM)
def test_a_malformed_stream_is_refused_before_its_first_token(s: Setup, case: str) -> None:
    s.remote.answer = HOSTILE_STREAM[case]
    status, _, events = ask_stream(s, "cloud")
    assert status == 503 and events == [], events


def test_a_compressed_answer_is_decoded_and_no_header_of_the_remotes_is_relayed(s: Setup) -> None:
    s.remote.answer = gzipped(json.dumps(completion("zipped")).encode())
    answer = ask(s, "cloud")
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "zipped"
    assert "content-encoding" not in answer.headers
    s.remote.answer = http("200 OK", json.dumps(completion()).encode(), {"Content-Type": "application/json", "Set-Cookie": "remote=1; Path=/",
                                                                         "X-Remote-Secret": "1"})  # fmt: skip
    answer = ask(s, "cloud")
    assert answer.status_code == 200 and not {"set-cookie", "x-remote-secret"} & set(answer.headers)
    ask(s, "cloud")
    assert "cookie" not in s.remote.posts[-1][1]  # the remote's cookie is never kept for the next client


def test_an_endless_stream_ends_with_an_error_at_the_tenants_timeout(s: Setup) -> None:
    def endless(body: dict[str, Any]) -> Iterator[tuple[bytes, float]]:
        yield b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n", 0.0
        for _ in range(10_000):  # about 500 s: far past the tenant's 4 s
            yield b"data: " + json.dumps(chunk("more")).encode() + b"\n\n", 0.05

    s.remote.answer = endless
    started = time.monotonic()
    status, _, events = ask_stream(s, "cloud")
    assert status == 200 and time.monotonic() - started < 30
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 504 and "longer than the tenant's timeout" in events[-2]["error"]["message"]
    assert events[-2]["x_zoo"]["remote"] == f"127.0.0.1:{s.remote.port}"


def test_a_remote_that_goes_away_makes_its_tenant_unavailable_and_only_it_until_it_returns(s: Setup) -> None:
    nokey = s.health()["tenants"]["nokey"]
    assert nokey["state"] == "unavailable" and "tenants.nokey.remote.key_file" in nokey["error"] and "absent" in nokey["error"]

    s.remote.stop()
    away = s.wait_state("cloud", "unavailable")
    assert s.remote.url in away["error"] and "unreachable" in away["error"]
    started = time.monotonic()
    answer = ask(s, "cloud")
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5" and time.monotonic() - started < 5
    assert "unreachable" in answer.json()["error"]["message"]
    assert ask(s, "chat").status_code == 200 and ask(s, "self", max_tokens=2).status_code == 200
    assert "cloud remote-model at 127.0.0.1" in s.health()["status"] and "unavailable" in s.health()["status"]
    assert 'zoo:remote_up{tenant="cloud"} 0.0' in httpx.get(s.r.url + "/metrics", timeout=30).text
    routed = ask(s, "assistant")
    assert routed.status_code == 200 and routed.json()["x_zoo"]["route"]["tenant"] == "chat"

    s.remote.start()  # the same port: back
    s.wait_state("cloud", "serving", timeout=10)
    assert ask(s, "cloud").status_code == 200

    s.remote.models = ["another"]  # up, but no longer serving the tenant's model
    with contextlib.suppress(AssertionError):
        away = s.wait_state("cloud", "unavailable", timeout=10)
    assert "does not list model 'remote-model'" in away["error"], away
    s.remote.models = ["remote-model"]
    s.wait_state("cloud", "serving", timeout=10)


def test_chat_talks_to_a_remote_tenant_holding_the_conversation_itself(s: Setup) -> None:
    from click.testing import CliRunner

    from zoo_agent.cli.main import cli

    before = len(s.remote.posts)
    result = CliRunner().invoke(cli, ["chat", "--url", s.r.url, "--model", "cloud"], input="Hello\nAgain\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "a remote tenant" in result.output and f"remote 127.0.0.1:{s.remote.port}]" in result.output and "peer words" in result.output
    first, second = (json.loads(raw) for _, _, raw in s.remote.posts[before:])
    assert "session" not in second and [m["content"] for m in second["messages"]] == ["Hello", "peer words", "Again"]
    assert [m["content"] for m in first["messages"]] == ["Hello"]


def test_a_host_of_remote_tenants_only_is_ready_at_once_and_a_reload_rotates_the_key(tmp_path: Path) -> None:
    """Nothing loads here: READY once the router listens. A HUP reads the key file again; a key that is the
    resident's own API key is refused, and never sent."""
    remote = RemoteStandIn(["remote-model"]).start()
    (tmp_path / "remote-key").write_text("first-secret\n")
    (tmp_path / "client").write_text("client-secret\n")
    w = World(tmp_path)
    doc = {"tenants": {"cloud": {"backend": "openai", "remote": {"base_url": remote.url, "model": "remote-model", "key_file": str(tmp_path / "remote-key"),
                                                                   "poll_seconds": 1}}},
           "hosts": {"h": {"tenants": ["cloud"]}}}  # fmt: skip
    w.index.write_text(json.dumps(doc))
    assert w.run("apply").exit_code == 0
    r = Resident(w, "--api-key-file", str(tmp_path / "client"))
    auth = {"Authorization": "Bearer client-secret"}

    def key_seen(key: str) -> None:
        deadline = time.monotonic() + 30
        while not any(h.get("authorization") == f"Bearer {key}" for _, h in remote.gets[-3:]):
            assert time.monotonic() < deadline, remote.gets[-3:]
            time.sleep(0.1)

    try:
        r.wait_ready(timeout=60)
        key_seen("first-secret")
        body = {"model": "cloud", "messages": [{"role": "user", "content": "Hi"}]}
        deadline = time.monotonic() + 30
        while (answer := httpx.post(r.url + "/v1/chat/completions", json=body, headers=auth, timeout=30)).status_code != 200:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.2)
        assert remote.posts[-1][1]["authorization"] == "Bearer first-secret"
        (tmp_path / "remote-key").write_text("second-secret\n")
        r.proc.send_signal(signal.SIGHUP)
        key_seen("second-secret")
        assert httpx.post(r.url + "/v1/chat/completions", json=body, headers=auth, timeout=30).status_code == 200
        assert remote.posts[-1][1]["authorization"] == "Bearer second-secret"

        (tmp_path / "remote-key").write_text("client-secret\n")  # the clients' key: never sent anywhere
        r.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while (cloud := httpx.get(r.url + "/health", timeout=10).json()["tenants"]["cloud"])["state"] != "unavailable":
            assert time.monotonic() < deadline, cloud
            time.sleep(0.1)
        assert "a key of the resident's own" in cloud["error"] and "client-secret" not in cloud["error"]
        assert httpx.post(r.url + "/v1/chat/completions", json=body, headers=auth, timeout=30).status_code == 503
        time.sleep(1.5)  # a poll interval: none goes out with it either
        assert not any("client-secret" in json.dumps(h) for _, h in [*remote.gets, *((p, h) for p, h, _ in remote.posts)])
    finally:
        out = r.stop()
        remote.stop()
    assert "Traceback" not in out and not any(k in out for k in ("first-secret", "second-secret", "client-secret")), out[-3000:]
