"""Delegation to peers (issue #22), two real residents on 127.0.0.1: host a does not serve
`big` and asks host b, which the index says serves it and accepts it from peers; the fleet
key, not a client's, crosses between them; what a peer may ask is bounded; a peer that went
away is named in the 503. (The fleet of namespaces tests failover, cooldown and versions.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.resident import Resident, free_port
from tests.support.world import World

pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")

pytestmark = pytest.mark.resident

GEN = {"generation": {"temperature": 0, "max_tokens": 4}}


def _host(tmp: Path, tiny: dict[str, bytes], ports: dict[str, int], host: str) -> World:
    tmp.mkdir()
    w = World(tmp)
    w.artifact("m", "v1", tiny)
    w.artifact("m2", "v1", {**tiny, "config.json": tiny["config.json"].replace(b"{", b'{"_v": 2,', 1)})
    doc = {"models": w.models, "loras": {}, "tenants": {"chat": {"model": "m", **GEN}, "big": {"model": "m2", **GEN}},
           "routes": {"assistant": {"rules": [{"tenant": "chat", "when": {"max_words": 3}}], "default": "big"}},
           "hosts": {"a": {"tenants": ["chat"], "endpoint": f"http://127.0.0.1:{ports['a']}", "routes": ["assistant"]},
                     "b": {"tenants": ["chat", "big"], "endpoint": f"http://127.0.0.1:{ports['b']}", "accept_from_peers": ["big"]}}}  # fmt: skip
    w.index.write_text(json.dumps(doc, indent=2))
    assert w.run("apply", "--host", host).exit_code == 0
    return w


@pytest.fixture
def pair(tmp_path: Path, tiny: dict[str, bytes]) -> Iterator[tuple[Resident, Resident, Path]]:
    ports = {"a": free_port(), "b": free_port()}
    (tmp_path / "fleet-key").write_text("fleet-secret\n")
    (tmp_path / "client-a").write_text("client-a\n")
    (tmp_path / "client-b").write_text("client-b\n")
    residents = []
    try:
        for host in ("a", "b"):
            w = _host(tmp_path / host, tiny, ports, host)
            r = Resident(w, "--host", host, "--listen", f"127.0.0.1:{ports[host]}", "--fleet-key-file", str(tmp_path / "fleet-key"),
                         "--api-key-file", str(tmp_path / f"client-{host}"))  # fmt: skip
            r.port = ports[host]
            residents.append(r)
        for r in residents:
            r.notify.wait(lambda m: "READY" in m, timeout=180)
        yield residents[0], residents[1], tmp_path
    finally:
        for r in residents:
            if r.proc.returncode is None:
                r.stop()


def _ask(r: Resident, model: str, key: str, **kw: Any) -> Any:
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": "Hello there"}], **kw}
    return httpx.post(r.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def test_a_tenant_the_host_lacks_is_answered_by_the_peer_that_serves_it(pair: tuple[Resident, Resident, Path]) -> None:
    import httpx

    a, b, _ = pair
    answer = _ask(a, "big", "client-a")  # b would refuse client-a: only the fleet key crosses
    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert document["model"] == "big" and document["system_fingerprint"] == "m2@v1" and document["x_zoo"]["host"] == "b"
    local = _ask(a, "chat", "client-a").json()
    assert "host" not in local.get("x_zoo", {})  # answered here

    with httpx.stream("POST", a.url + "/v1/chat/completions", headers={"Authorization": "Bearer client-a"}, timeout=120,
                      json={"model": "big", "messages": [{"role": "user", "content": "Hi"}], "stream": True}) as resp:  # fmt: skip
        assert resp.status_code == 200
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["x_zoo"]["host"] == "b" and chunks[-1]["choices"][0]["finish_reason"]

    # A route whose default lives on the peer: the short question stays here, the long one goes there.
    short = _ask(a, "assistant", "client-a").json()
    assert short["model"] == "chat" and short["x_zoo"]["route"]["tenant"] == "chat" and "host" not in short["x_zoo"]
    body = {"model": "assistant", "messages": [{"role": "user", "content": "Tell me all about the zoo and its models"}]}
    long = httpx.post(a.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer client-a"}, timeout=120).json()
    assert long["model"] == "big" and long["x_zoo"]["host"] == "b" and long["x_zoo"]["route"] == {"route": "assistant", "tenant": "big", "rule": "default"}

    # A session's turns live on the host that holds it: they never go to a peer, which would answer without them.
    crossing = _ask(a, "big", "client-a", session="s1")
    assert crossing.status_code == 400 and "sessions do not cross hosts" in crossing.json()["error"]["message"]
    assert _ask(a, "assistant", "client-a", session="s2").json()["model"] == "chat"
    kept = httpx.post(a.url + "/v1/chat/completions", json={**body, "session": "s2"}, headers={"Authorization": "Bearer client-a"}, timeout=120)
    assert kept.status_code == 503 and "a route session does not cross hosts" in kept.json()["error"]["message"]

    health = httpx.get(a.url + "/health", timeout=10).json()
    peer = health["peers"]["b"]
    assert (peer["state"], peer["reason"], peer["tenants"]) == ("ok", None, {"big": "ok"}) and isinstance(peer["busy"], int)
    assert "peers: b ok" in health["status"]
    metrics = httpx.get(a.url + "/metrics", timeout=30).text
    assert 'zoo:peer_requests_total{code="200",peer="b",tenant="big"} 3.0' in metrics
    assert 'zoo:peer_up{peer="b"} 1.0' in metrics
    assert 'zoo:router_requests_total{code="200",tenant="big"}' in httpx.get(b.url + "/metrics", timeout=30).text


def test_what_a_peer_may_ask_is_bounded_by_the_fleet_key_and_accept_from_peers(pair: tuple[Resident, Resident, Path]) -> None:
    import httpx

    _, b, _ = pair
    body = {"model": "big", "messages": [{"role": "user", "content": "Hi"}]}

    def as_peer(key: str, model: str = "big") -> httpx.Response:
        return httpx.post(b.url + "/v1/chat/completions", json={**body, "model": model}, timeout=60,
                          headers={"Authorization": f"Bearer {key}", "X-Zoo-Peer": "a"})  # fmt: skip

    assert as_peer("client-b").status_code == 401  # a client's key is not a fleet key
    assert as_peer("wrong").status_code == 401
    refused = as_peer("fleet-secret", "chat")  # b serves chat, but not for peers
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "peer_not_accepted"
    assert as_peer("fleet-secret").status_code == 200
    system = httpx.post(b.url + "/v1/chat/completions", json=body, timeout=60,
                        headers={"Authorization": "Bearer fleet-secret", "X-Zoo-Peer": "a", "X-Zoo-Priority": "system"})  # fmt: skip
    assert system.status_code == 403 and system.json()["error"]["param"] == "X-Zoo-Priority"  # the fleet key grants what a client key does (issue #31)
    sessions = httpx.get(b.url + "/v1/sessions/s", params={"model": "big"}, timeout=10, headers={"Authorization": "Bearer fleet-secret", "X-Zoo-Peer": "a"})
    assert sessions.status_code == 403  # the fleet key asks for generations, never for clients' conversations
    assert _ask(b, "big", "fleet-secret").status_code == 401  # nor is the fleet key a client's


def test_a_peer_that_went_away_is_named_in_the_503(pair: tuple[Resident, Resident, Path]) -> None:
    import httpx

    a, b, _ = pair
    assert _ask(a, "big", "client-a").status_code == 200
    b.stop()
    a.notify.wait(lambda m: "peers: b unreachable" in m.get("STATUS", ""), timeout=30)
    answer = _ask(a, "big", "client-a")
    assert answer.status_code == 503
    message = answer.json()["error"]["message"]
    assert message.startswith("tenant 'big' is not served here; no peer could answer") and "b: unreachable" in message
    assert httpx.get(a.url + "/health", timeout=10).json()["peers"]["b"]["state"] == "unreachable"
    assert _ask(a, "chat", "client-a").status_code == 200  # its own tenant is unaffected
