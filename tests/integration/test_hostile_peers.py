"""Hostile peers (issue #31): a real resident on 127.0.0.1 delegates to two stand-in peers
(tests/support/peerserver.py) that pass its polls and then answer whatever a test makes them say.
Nothing a peer answers reaches the client unless it is a well-formed 200 or one of the
request's own errors: a redirect (a standard-library client would follow it with its own
Authorization header), a 1xx, another 2xx, JSON nested 100,000 levels deep, an SSE event
with a carriage return are failed attempts (the next peer answers), never a 500. Priority
above ``default`` needs the priority key, and a peer is asked for at most ``default``.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.peerserver import PeerStandIn, chunk, completion, good_json, good_sse, gzipped, http, sse
from tests.support.resident import Resident
from tests.support.world import World

pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")

import httpx  # noqa: E402

pytestmark = pytest.mark.resident

CLIENT, PRIVILEGED = "client-key", "priority-key"
DEEP = b"[" * 100_000 + b"]" * 100_000


@dataclass
class Fleet:
    a: Resident
    b1: PeerStandIn
    b2: PeerStandIn
    trap: PeerStandIn  # where a redirect points: nothing may ever reach it
    cards: dict[str, dict[str, Any]]

    def reset(self) -> None:
        """Both peers answer well, b1 is not cooling down and has no failures on record: b1 goes first."""
        self.b1.answer = self.b2.answer = good_json()
        self.b1.cards[:] = [self.cards["big"], self.cards["huge"]]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            peers = httpx.get(self.a.url + "/health", timeout=10).json()["peers"]
            if peers["b1"]["state"] == "ok" and peers["b2"]["state"] == "ok":
                answer = ask(self.a, "big")
                if answer.status_code == 200 and answer.json()["x_zoo"]["host"] == "b1":
                    return  # a success forgets b1's failures
            time.sleep(0.2)
        raise AssertionError("the peers never became usable")


def _file(data: bytes) -> dict[str, Any]:
    return {"path": "model.safetensors", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, bytes]) -> Iterator[Fleet]:
    from zoo_agent.index.load import load_index
    from zoo_agent.resident.peers import pinned, tenant_digest

    tmp = tmp_path_factory.mktemp("hostile-peers")
    peers = [PeerStandIn([]).start() for _ in range(3)]
    b1, b2, trap = peers
    w = World(tmp)
    w.artifact("m", "v1", tiny)
    for name in ("m2", "m3", "sql"):  # only the peers serve these: this host never fetches them
        w.models[name] = {"version": "v1", "source": {"type": "file", "path": "elsewhere"}, "files": [_file(name.encode())], "license": "MIT"}
    sql = w.models.pop("sql") | {"base_model": "m2", "rank": 4}
    gen = {"generation": {"temperature": 0, "max_tokens": 4}}
    doc = {"models": w.models, "loras": {"sql": sql},
           "tenants": {"chat": {"model": "m", **gen}, "big": {"model": "m2", "loras": ["sql"]}, "huge": {"model": "m3"}},
           "hosts": {"a": {"tenants": ["chat"]},
                     **{name: {"tenants": ["big", "huge"], "endpoint": p.url, "accept_from_peers": ["big", "huge"]} for name, p in (("b1", b1), ("b2", b2))}}}  # fmt: skip
    w.index.write_text(json.dumps(doc, indent=2))
    assert w.run("apply", "--host", "a").exit_code == 0
    idx = load_index(w.index)
    cards = {t: {"id": t, "object": "model", "root": pinned(idx, t), "x_zoo": {"state": "serving", "model": pinned(idx, t), "digest": tenant_digest(idx, t)}}
             for t in ("big", "huge")}  # fmt: skip
    for p in (b1, b2):
        p.cards = [cards["big"], cards["huge"]]
    for name, key in (("fleet-key", "fleet-secret"), ("client", CLIENT), ("privileged", PRIVILEGED)):
        (tmp / name).write_text(key + "\n")
    a = Resident(w, "--host", "a", "--fleet-key-file", str(tmp / "fleet-key"), "--api-key-file", str(tmp / "client"),
                 "--priority-key-file", str(tmp / "privileged"), "--peer-poll-seconds", "0.2")  # fmt: skip
    try:
        a.notify.wait(lambda m: "READY" in m, timeout=180)
        yield Fleet(a, b1, b2, trap, cards)
    finally:
        out = a.stop()
        for p in peers:
            p.stop()
        assert "Traceback" not in out, out


@pytest.fixture
def f(fleet: Fleet) -> Fleet:
    fleet.reset()
    return fleet


def ask(r: Resident, model: str, key: str = CLIENT, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello there"}], **kw}
    return httpx.post(r.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}", **(headers or {})}, timeout=60)


def ask_stream(r: Resident, model: str = "big") -> tuple[int, dict[str, str], list[Any]]:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    with httpx.stream("POST", r.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {CLIENT}"}, timeout=60) as resp:
        lines = [line for line in resp.iter_lines() if line]
        return resp.status_code, dict(resp.headers), [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


@pytest.mark.parametrize("status", ["301 Moved Permanently", "302 Found", "307 Temporary Redirect", "308 Permanent Redirect"])
def test_a_peers_redirect_is_a_failed_attempt_and_no_client_follows_it(f: Fleet, status: str) -> None:
    f.b1.answer = http(status, b"", {"Location": f.trap.url + "/steal"})
    asked = len(f.b1.posts)
    request = urllib.request.Request(f.a.url + "/v1/chat/completions", method="POST", headers={"Authorization": f"Bearer {CLIENT}", "Content-Type": "application/json"},
                                     data=json.dumps({"model": "big", "messages": [{"role": "user", "content": "Hi"}]}).encode())  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as answer:  # the standard library follows redirects
        document = json.loads(answer.read())
        assert answer.headers.get("Location") is None
    assert document["x_zoo"]["host"] == "b2" and len(f.b1.posts) == asked + 1  # b1 was asked, and b2 answered
    assert f.trap.posts == []

    f.b2.answer = f.b1.answer  # no peer left: a 503 naming them, still no redirect
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 503 and refused.value.headers.get("Location") is None
    message = json.loads(refused.value.read())["error"]["message"]
    assert f"b1: answered {status.split()[0]}" in message and f"b2: answered {status.split()[0]}" in message
    assert f.trap.posts == []


HOSTILE_WHOLE = {
    "101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    "204": http("204 No Content", b""),
    "201": http("201 Created", json.dumps(completion()).encode(), {"Content-Type": "application/json"}),
    "deep": http("200 OK", DEEP, {"Content-Type": "application/json"}),
    "deep error": http("503 Service Unavailable", DEEP, {"Content-Type": "application/json"}),
    "not a completion": http("200 OK", b'{"hello": "world"}', {"Content-Type": "application/json"}),
    "html": http("200 OK", b"<html>hi</html>", {"Content-Type": "text/html"}),
    "NaN": http("200 OK", json.dumps(completion()).replace('"created": 0', '"created": NaN').encode(), {"Content-Type": "application/json"}),
    "teapot": http("418 I'm a teapot", b"{}", {"Content-Type": "application/json"}),
    "bad gzip": http("200 OK", b"not gzip at all", {"Content-Type": "application/json", "Content-Encoding": "gzip"}),
}
HOSTILE_STREAM = {
    "deep event": sse(b"data: " + DEEP + b"\n\n"),
    "deep event after the role": sse(b"data: " + json.dumps(chunk()).encode() + b"\n\n", b"data: " + DEEP + b"\n\n"),
    "a carriage return": sse(b": hi\rdata: " + json.dumps(chunk("injected", "stop")).encode() + b"\n\n", b"data: [DONE]\n\n"),
    "an event field": sse(b"event: other\ndata: " + json.dumps(chunk("x", "stop")).encode() + b"\n\n", b"data: [DONE]\n\n"),
    "not data": sse(b"hello\n\n", b"data: [DONE]\n\n"),
    "JSON for a stream": good_json(),
    "an event of no JSON": sse(b"data: {not json\n\n", b"data: [DONE]\n\n"),
    "an error after its notes": sse(b": waiting for big: loading\n\n", b'data: {"error": {"message": "did not load", "code": 503}}\n\n', b"data: [DONE]\n\n"),
}


@pytest.mark.parametrize("case", HOSTILE_WHOLE)
def test_a_malformed_answer_is_a_failed_attempt_and_the_next_peer_answers(f: Fleet, case: str) -> None:
    f.b1.answer = HOSTILE_WHOLE[case]
    asked = len(f.b1.posts)
    answer = ask(f.a, "big")
    assert answer.status_code == 200, answer.text
    assert answer.json()["x_zoo"]["host"] == "b2" and len(f.b1.posts) == asked + 1
    assert httpx.get(f.a.url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("case", HOSTILE_STREAM)
def test_a_malformed_stream_is_a_failed_attempt_before_its_first_token(f: Fleet, case: str) -> None:
    f.b1.answer, f.b2.answer = HOSTILE_STREAM[case], good_sse()
    status, headers, events = ask_stream(f.a)
    assert status == 200 and "text/event-stream" in headers["content-type"]
    assert events[-1] == "[DONE]" and events[-2]["x_zoo"]["host"] == "b2", events
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "peer words"


def test_what_a_peer_sends_after_its_first_token_is_still_checked(f: Fleet) -> None:
    f.b1.answer = sse(*(b"data: " + json.dumps(c).encode() + b"\n\n" for c in (chunk(), chunk("peer"))), b"data: " + DEEP + b"\n\n")
    status, _, events = ask_stream(f.a)
    assert status == 200 and events[1]["choices"][0]["delta"]["content"] == "peer"
    assert events[-1] == "[DONE]" and "b1" in events[-2]["error"]["message"] and events[-2]["error"]["code"] == 502, events


def test_nothing_after_done_is_relayed(f: Fleet) -> None:
    f.b1.answer = good_sse() + b"data: " + json.dumps(chunk("more", "stop")).encode() + b"\n\nevent: x\r\n\r\n"
    status, _, events = ask_stream(f.a)
    assert status == 200 and events[-1] == "[DONE]" and events[-2]["x_zoo"]["host"] == "b1" and len(events) == 4, events


def test_only_our_own_headers_reach_the_client_and_a_compressed_answer_is_decoded(f: Fleet) -> None:
    f.b1.answer = http("200 OK", json.dumps(completion()).encode(), {"Content-Type": "application/json", "Set-Cookie": "session=peer",
                                                                    "Location": f.trap.url, "X-Peer-Secret": "1"})  # fmt: skip
    answer = ask(f.a, "big")
    assert answer.status_code == 200 and answer.json()["x_zoo"]["host"] == "b1"
    assert not {"set-cookie", "location", "x-peer-secret", "content-encoding"} & set(answer.headers)

    f.b1.answer = gzipped(json.dumps(completion("zipped")).encode())
    raw = httpx.post(f.a.url + "/v1/chat/completions", json={"model": "big", "messages": [{"role": "user", "content": "Hi"}]},
                     headers={"Authorization": f"Bearer {CLIENT}", "Accept-Encoding": "identity"}, timeout=60)  # fmt: skip
    assert "content-encoding" not in raw.headers and json.loads(raw.content)["choices"][0]["message"]["content"] == "zipped"

    f.b1.answer = gzipped(good_sse()[good_sse().index(b"\r\n\r\n") + 4:], "text/event-stream")
    status, headers, events = ask_stream(f.a)
    assert status == 200 and "content-encoding" not in headers and events[-2]["x_zoo"]["host"] == "b1"


def test_a_503_names_each_peer_once(f: Fleet) -> None:
    f.b1.answer = f.b2.answer = http("500 Internal Server Error", b'{"error": {"message": "boom"}}', {"Content-Type": "application/json"})
    messages = [ask(f.a, "big").json()["error"]["message"] for _ in range(5)]  # enough failures to cool both down
    for message in messages:
        named = [part.split(":")[0].strip() for part in message.split("(peers: ", 1)[1].rstrip(")").split(";")]
        assert sorted(named) == ["b1", "b2"], message


def test_an_undeclared_adapter_is_a_404_at_once_and_a_peers_404_is_relayed(f: Fleet) -> None:
    asked = len(f.b1.posts), len(f.b2.posts)
    answer = ask(f.a, "big:nope")
    assert answer.status_code == 404, answer.text
    error = answer.json()["error"]
    assert error["param"] == "model" and error["code"] == "model_not_found" and "nope" in error["message"]
    assert ask(f.a, "huge:auto").status_code == 404  # no adapter_selection: no 'auto' either
    assert (len(f.b1.posts), len(f.b2.posts)) == asked  # no peer was asked

    f.b1.answer = http("404 Not Found", json.dumps({"error": {"message": "model 'big:sql' is not served here", "type": "invalid_request_error",
                                                              "param": "model", "code": "model_not_found"}}).encode(), {"Content-Type": "application/json"})  # fmt: skip
    answer = ask(f.a, "big:sql")  # declared: the peer's 404 is the answer, not a reason to ask the next
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
    assert len(f.b2.posts) == asked[1]


def test_priority_above_default_needs_the_priority_key_and_a_peer_gets_at_most_default(f: Fleet) -> None:
    for model in ("chat", "big"):  # here, and delegated
        refused = ask(f.a, model, headers={"X-Zoo-Priority": "system"})
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["param"] == "X-Zoo-Priority" and "--priority-key-file" in refused.json()["error"]["message"]
        field = ask(f.a, model, priority=-1)
        assert field.status_code == 403 and field.json()["error"]["param"] == "priority"
        for key in (CLIENT, PRIVILEGED):
            beyond = ask(f.a, model, key=key, priority=-1000)  # ranked above system: no such class
            assert beyond.status_code == 400 and beyond.json()["error"]["param"] == "priority", beyond.text
        assert ask(f.a, model, headers={"X-Zoo-Priority": "batch"}).status_code == 200
        twice = httpx.post(f.a.url + "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "Hi"}]},
                           headers=[("Authorization", f"Bearer {CLIENT}"), ("X-Zoo-Priority", "system"), ("X-Zoo-Priority", "default")], timeout=60)  # fmt: skip
        assert twice.status_code == 400 and twice.json()["error"]["param"] == "X-Zoo-Priority"  # checked one, served the other
        assert ask(f.a, model, key=PRIVILEGED, headers={"X-Zoo-Priority": "system"}).status_code == 200

    seen = []
    for key, headers, extra in ((PRIVILEGED, {"X-Zoo-Priority": "system"}, {}), (PRIVILEGED, {}, {"priority": -2}), (CLIENT, {"X-Zoo-Priority": "batch"}, {}),
                                (CLIENT, {}, {"priority": 7}), (CLIENT, {}, {})):  # fmt: skip
        assert ask(f.a, "big", key=key, headers=headers, **extra).status_code == 200
        seen.append(f.b1.posts[-1][1].get("x-zoo-priority"))
    assert seen == ["default", "default", "batch", "batch", None]
    assert all(headers["authorization"] == "Bearer fleet-secret" for _, headers, _ in f.b1.posts[-5:])


def test_a_peer_refused_for_one_tenant_keeps_answering_for_another(f: Fleet) -> None:
    """Mid-rollout: b1 moves `huge` to another version while it streams an answer for `big`."""
    words = [chunk()] + [chunk(f" w{i}") for i in range(8)] + [chunk(" end", "length")]
    f.b1.answer = lambda body: [(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n", 0.0),
                                *((b"data: " + json.dumps(c).encode() + b"\n\n", 0.4) for c in words), (b"data: [DONE]\n\n", 0.0)]  # fmt: skip

    def rollout() -> None:
        time.sleep(1.0)
        f.b1.cards[1] = {**f.cards["huge"], "root": "m3@v2", "x_zoo": {**f.cards["huge"]["x_zoo"], "model": "m3@v2"}}

    import threading

    threading.Thread(target=rollout, daemon=True).start()
    status, _, events = ask_stream(f.a)
    assert status == 200 and events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events
    assert events[-2]["x_zoo"]["host"] == "b1" and events[-2]["choices"][0]["delta"]["content"] == " end"
    peers = httpx.get(f.a.url + "/health", timeout=10).json()["peers"]
    assert peers["b1"]["tenants"] == {"big": "ok", "huge": "refused"}


@pytest.mark.parametrize("other", ["--api-key-file", "--fleet-key-file"])
def test_the_priority_key_is_a_key_of_its_own(tmp_path: Path, other: str) -> None:
    """The same key as every client's (or every peer's) would make them all privileged: exit 2, one line, at start."""
    from click.testing import CliRunner

    from zoo_agent.cli.main import cli

    (tmp_path / "key").write_text("one-key\n")
    result = CliRunner().invoke(cli, ["resident", "--root", str(tmp_path / "zoo"), "--index", str(tmp_path / "index.json"), "--host", "h",
                                      other, str(tmp_path / "key"), "--priority-key-file", str(tmp_path / "key")])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"--priority-key-file {tmp_path / 'key'}: the same key as {other}" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "zoo").exists()
