"""The fleet test (issue #22): seven hosts on one machine, each in its own network namespace
on a private bridge (tests/support/netns.py), each with its own zoo root, `apply` of its own slice
from one hub mirror in a namespace of its own, and its own resident. Real processes, the
tiny model, one index; only the stale host reads another (older) one.

    host  serves        its index pins  fleet key   role in the scenarios
    a     o             v2 (the fleet)  right       origin: lacks t, asks peers
    e     t             v1              right       stale: must be refused
    f     t             v2              wrong       must be refused (401)
    b     t             v2              right       first correct peer in the index's order
    c     t             v2              right
    d     t             v2              right
    g     o             v2              right       a second origin that polls every 30 s (the kill)

In the index, e and f come before b, c and d: with every peer idle, the table's order would
pick e first, so an answer from b shows that e and f were refused, not skipped by chance.
Tests run in file order against one fleet (module scope) and undo what they change,
except the kill: b stays dead for the tests after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.httpfiles import running
from tests.support.hubserver import HubServer, Repo
from tests.support.netns import MIRROR_ADDRESS, Network, unavailable, wait_until
from tests.support.resident import Resident

pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")

pytestmark = [pytest.mark.slow, pytest.mark.resident]

CLIENT_KEY, FLEET_KEY = "client-secret", "fleet-secret"
ORDER = ("a", "e", "f", "b", "c", "d", "g")
SERVES = {"a": "o", "g": "o", "e": "t", "f": "t", "b": "t", "c": "t", "d": "t"}
PEERS = ("e", "f", "b", "c", "d")
TENANT = {"generation": {"temperature": 0, "max_tokens": 4}, "resources": {"max_batch": 1, "max_queue": 8}, "pinned": True}


@dataclass
class Answer:
    status: int
    host: str | None  # x_zoo.host: who answered, when a peer did
    body: Any


@dataclass
class Fleet:
    net: Network
    residents: dict[str, Resident]
    index: Path
    work: Path

    def url(self, hid: str) -> str:
        return self.net.hosts[hid].url

    def ask(self, at: str, tenant: str = "t", *, stream: bool = False, max_tokens: int = 4, key: str = CLIENT_KEY,
            headers: dict[str, str] | None = None, timeout: float = 60) -> Answer:  # fmt: skip
        """A chat request from inside host ``at``'s namespace to its own resident."""
        import httpx

        body = {"model": tenant, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": max_tokens, "stream": stream}
        hdrs = {"Authorization": f"Bearer {key}", **(headers or {})}

        def go() -> Answer:
            with httpx.Client(timeout=timeout) as http:
                if not stream:
                    r = http.post(self.url(at) + "/v1/chat/completions", json=body, headers=hdrs)
                    doc = r.json()
                    return Answer(r.status_code, (doc.get("x_zoo") or {}).get("host"), doc)
                with http.stream("POST", self.url(at) + "/v1/chat/completions", json=body, headers=hdrs) as r:
                    lines = [line for line in r.iter_lines() if line]
                chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
                status = r.status_code if not any("error" in c for c in chunks) and (not chunks or lines[-1] == "data: [DONE]") else 599
                last = chunks[-1] if chunks else {}
                return Answer(status, (last.get("x_zoo") or {}).get("host"), chunks)

        return self.net.call(at, go, timeout=timeout + 30)

    def health(self, hid: str) -> dict[str, Any]:
        import httpx

        return self.net.call(hid, lambda: httpx.get(self.url(hid) + "/health", timeout=10).json(), timeout=30)

    def metrics(self, hid: str) -> str:
        import httpx

        return self.net.call(hid, lambda: httpx.get(self.url(hid) + "/metrics", timeout=10).text, timeout=30)

    def peer(self, at: str, peer: str) -> dict[str, Any]:
        peers: dict[str, dict[str, Any]] = self.health(at).get("peers", {})
        return peers.get(peer, {})


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a counter's or gauge's samples whose labels include ``labels`` (0 when none)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))  # fmt: skip


def _entry(commit: str, files: dict[str, bytes], version: str) -> dict[str, Any]:
    return {"version": version, "source": {"type": "hf", "repo": "org/tiny", "revision": commit}, "license": "MIT",
            "files": [{"path": n, "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in sorted(files.items())]}  # fmt: skip


def _index(net: Network, model: dict[str, Any]) -> dict[str, Any]:
    hosts = {h: {"resident": SERVES[h], "endpoint": net.hosts[h].url, "accept_from_peers": [SERVES[h]] if h in PEERS else []} for h in ORDER}
    return {"models": {"m": model}, "tenants": {"o": {"model": "m", **TENANT}, "t": {"model": "m", **TENANT}}, "hosts": hosts}


def _start(server: HubServer) -> Any:
    context = running(server)
    context.__enter__()
    return lambda: context.__exit__(None, None, None)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, bytes]) -> Iterator[Fleet]:
    why = unavailable()
    if why:
        pytest.skip(f"the fleet test builds network namespaces: {why}")
    work = tmp_path_factory.mktemp("fleet")
    net = Network(work)
    residents: dict[str, Resident] = {}
    try:
        for hid in ORDER:
            net.add(hid)
        hub = net.serve_in("mirror", MIRROR_ADDRESS, HubServer, _start)
        old = {**tiny, "config.json": tiny["config.json"].replace(b"{", b'{"_v": 1,', 1)}
        repo = hub.repos.setdefault("org/tiny", Repo())
        v1, v2 = repo.commit(old), repo.commit(tiny)
        index, stale = work / "index.json", work / "index-e.json"
        index.write_text(json.dumps(_index(net, _entry(v2, tiny, "v2")), indent=2))
        stale.write_text(json.dumps(_index(net, _entry(v1, old, "v1")), indent=2))
        indexes = {h: stale if h == "e" else index for h in ORDER}
        for name, text in (("client", CLIENT_KEY), ("fleet", FLEET_KEY), ("wrong", "not-the-fleet-key")):
            (work / name).write_text(text + "\n")

        def apply(hid: str) -> None:
            done = net.run(hid, sys.executable, "-m", "zoo_agent", "apply", "--root", work / hid, "--index", indexes[hid], "--host", hid,
                           env={"HF_ENDPOINT": hub.url})  # fmt: skip
            assert done.returncode == 0, f"{hid}: apply exited {done.returncode}: {done.stderr}"

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(apply, ORDER))
        for hid in ORDER:
            key = work / ("wrong" if hid == "f" else "fleet")
            poll = ("--peer-poll-seconds", "60") if hid == "g" else ()
            if hid == "g":  # g's first poll must find every peer serving: g starts once they all are
                for r in residents.values():
                    r.wait_ready(timeout=180)
            residents[hid] = Resident.on_host(net, hid, work / hid, indexes[hid], "--api-key-file", work / "client", "--fleet-key-file", key, *poll)
        residents["g"].wait_ready(timeout=180)
        fleet = Fleet(net, residents, index, work)
        wait_until("a has polled every peer", lambda: all(fleet.peer("a", p).get("state") not in (None, "unknown") for p in PEERS), 30)
        yield fleet
    finally:
        for r in residents.values():  # all at once: each takes a moment to stop
            r.terminate()
        for r in residents.values():
            r.stop()
        net.close()


def _rows(out: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["host"], r["tenant"]): r for r in json.loads(out)["tenants"]}


def test_fleet_status_across_the_namespaces(fleet: Fleet) -> None:
    """Asked from inside host a with the fleet key: every host answers over the bridge; e's
    older version, f's other fleet key and, once its cable is cut, c's silence are what make
    the fleet not ok."""
    status = ("-m", "zoo_agent", "fleet", "status", "--index", fleet.index, "--key-file", fleet.work / "fleet", "--json")
    done = fleet.net.run("a", sys.executable, *status)
    assert done.returncode == 1, done.stderr
    rows = _rows(done.stdout)
    assert {k: (r["served"], r["pinned"], r["state"]) for k, r in rows.items()} == {
        ("a", "o"): ("m@v2", "m@v2", "ok"), ("g", "o"): ("m@v2", "m@v2", "ok"), ("e", "t"): ("m@v1", "m@v2", "wrong version"),
        ("f", "t"): (None, "m@v2", "unreachable"), **{(h, "t"): ("m@v2", "m@v2", "ok") for h in ("b", "c", "d")}}  # fmt: skip
    assert "401" in rows[("f", "t")]["error"]
    assert rows[("b", "t")]["endpoint"] == "http://10.77.0.4:8000"

    fleet.net.link("c", up=False)
    try:
        done = fleet.net.run("a", sys.executable, *status, "--timeout", "1")
    finally:
        fleet.net.link("c", up=True)
    rows = _rows(done.stdout)
    assert done.returncode == 1 and rows[("c", "t")]["state"] == "unreachable" and "timed out" in rows[("c", "t")]["error"]
    assert rows[("d", "t")]["state"] == "ok"


def test_a_host_without_the_tenant_is_answered_by_a_verified_peer(fleet: Fleet) -> None:
    """a lacks t: b answers (e and f come first in the index and are idle, but are refused)."""
    answer = fleet.ask("a")
    assert (answer.status, answer.host, answer.body["system_fingerprint"]) == (200, "b", "m@v2")
    streamed = fleet.ask("a", stream=True)
    assert (streamed.status, streamed.host) == (200, "b") and streamed.body[-1]["choices"][0]["finish_reason"]
    local = fleet.ask("a", "o")
    assert local.status == 200 and local.host is None  # a's own tenant is answered at a

    peers = fleet.health("a")["peers"]
    assert {h: peers[h]["state"] for h in PEERS} == {"e": "refused", "f": "refused", "b": "ok", "c": "ok", "d": "ok"}
    assert "wrong version" in peers["e"]["reason"] and "m@v1" in peers["e"]["reason"]
    assert "401" in peers["f"]["reason"]
    metrics = fleet.metrics("a")
    assert metric(metrics, "zoo:peer_refusals_total", peer="e", tenant="t", reason="wrong_version") >= 1
    assert metric(metrics, "zoo:peer_refusals_total", peer="f", tenant="t", reason="unauthorized") >= 1
    assert metric(metrics, "zoo:peer_requests_total", peer="b", tenant="t", code="200") >= 2
    assert metric(metrics, "zoo:peer_requests_total", peer="e") == metric(metrics, "zoo:peer_requests_total", peer="f") == 0
    assert metric(metrics, "zoo:peer_up", peer="f") == 1  # reachable, and refused all the same

    # what f refuses, it refuses to anyone holding the fleet's key; e would answer, with v1
    as_peer = {"X-Zoo-Peer": "a"}
    passed_on = fleet.ask("a", key=FLEET_KEY, headers=as_peer)  # a request from a peer is never delegated again
    assert (passed_on.status, passed_on.body["error"]["code"]) == (403, "peer_not_accepted")
    wrong_key = fleet.net.call("a", lambda: _post(fleet.url("f"), FLEET_KEY, as_peer))
    assert wrong_key == 401


def _post(url: str, key: str, headers: dict[str, str]) -> int:
    import httpx

    body = {"model": "t", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    return httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}", **headers}, timeout=30).status_code


def _hold(fleet: Fleet, hid: str, n: int) -> list[socket.socket]:
    """``n`` long streamed requests to host ``hid``, sent from the mirror's namespace and never read:
    they keep its one batch slot busy and its queue non-empty until the sockets close."""
    body = json.dumps({"model": "t", "messages": [{"role": "user", "content": "Hold"}], "max_tokens": 3000, "ignore_eos": True,
                       "stream": True}).encode()  # fmt: skip
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {fleet.net.hosts[hid].address}\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip

    def send() -> socket.socket:
        sock = socket.create_connection((fleet.net.hosts[hid].address, 8000), timeout=10)
        sock.sendall(request)
        return sock

    return [fleet.net.call("mirror", send) for _ in range(n)]


def _idle(fleet: Fleet, hid: str) -> None:
    def idle() -> bool:
        t = fleet.health(hid)["tenants"]["t"]
        return bool(t["running"] + t["waiting"] == 0)

    wait_until(f"{hid} is idle again", idle, 60, every=0.2)


def test_the_busiest_peer_is_avoided(fleet: Fleet) -> None:
    held = _hold(fleet, "b", 2)  # max_batch 1: one runs, one waits
    try:
        wait_until("a sees b busy", lambda: fleet.peer("a", "b").get("busy", 0) >= 2, 20)
        answers = [fleet.ask("a") for _ in range(3)]
        assert [(x.status, x.host) for x in answers] == [(200, "c")] * 3  # c and d are idle; c comes first
        assert "b ok (2 " in fleet.health("a")["status"]  # the STATUS line names b's load
    finally:
        for sock in held:
            sock.close()
    _idle(fleet, "b")
    wait_until("a sees b idle", lambda: fleet.peer("a", "b").get("busy") == 0, 20)
    assert fleet.ask("a").host == "b"


def test_a_killed_peer_fails_over_before_the_first_token(fleet: Fleet) -> None:
    """g polls once a minute (it started last, seconds ago), so it still believes in b when b
    dies: the requests that go to b fail before their first token and go to c, and no client
    sees a failure; the fourth failure cools b down, and the rest go to c directly. (b stays dead.)"""
    assert [fleet.ask("g").host for _ in range(3)] == ["b"] * 3
    before = metric(fleet.metrics("g"), "zoo:peer_failovers_total", peer="b")
    fleet.residents["b"].kill()
    answers = [fleet.ask("g", stream=i % 2 == 1) for i in range(8)]
    assert [(x.status, x.host) for x in answers] == [(200, "c")] * 8
    metrics = fleet.metrics("g")
    assert metric(metrics, "zoo:peer_failovers_total", peer="b", tenant="t") == before + 4  # allowed_fails 3, then the cooldown
    assert metric(metrics, "zoo:peer_requests_total", peer="c", tenant="t", code="200") >= 8
    assert fleet.health("g")["peers"]["b"]["state"] == "cooling"  # more than 3 failures within a minute


def test_an_unreachable_peer_cools_down_then_is_used_again(fleet: Fleet) -> None:
    """The cable of the peer a asks first is cut, then four requests arrive at once: a still
    believes in the peer, so all four go to it, fail before their first token (one on a pooled
    connection that looks open) and fail over; no client sees a failure. The fourth failure
    within a minute cools the peer down: when the cable is back and a poll reaches it, it is
    "cooling" (and not asked) until the cooldown runs out, then asked again."""
    alive = [h for h in ("b", "c", "d") if fleet.residents[h].proc.poll() is None]
    wait_until("a knows who is gone", lambda: all(fleet.peer("a", h).get("state") == "unreachable" for h in {"b", "c", "d"} - set(alive)), 20)
    cut, other = fleet.ask("a").host, alive[1]
    assert cut == alive[0]
    failovers = metric(fleet.metrics("a"), "zoo:peer_failovers_total", peer=cut)
    fleet.net.link(cut, up=False)
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: fleet.ask("a", stream=i % 2 == 1), range(4)))
        assert [(x.status, x.host) for x in answers] == [(200, other)] * 4
        metrics = fleet.metrics("a")
        assert metric(metrics, "zoo:peer_failovers_total", peer=cut, tenant="t") == failovers + 4
        wait_until(f"a marks {cut} unreachable", lambda: fleet.peer("a", cut).get("state") == "unreachable", 10)
        assert f"{cut} unreachable" in fleet.health("a")["status"]
        assert metric(fleet.metrics("a"), "zoo:peer_up", peer=cut) == 0
    finally:
        fleet.net.link(cut, up=True)
    def reached() -> dict[str, Any]:
        peer = fleet.peer("a", cut)
        return peer if peer.get("state") != "unreachable" else {}

    cooling = wait_until(f"a reaches {cut} again", reached, 10, every=0.05)
    assert cooling["state"] == "cooling" and cooling["reason"].startswith("cooling down "), cooling
    assert fleet.ask("a").host == other  # not asked while it cools down
    wait_until(f"{cut} cooled down", lambda: fleet.peer("a", cut).get("state") == "ok", 10, every=0.1)
    assert fleet.ask("a").host == cut
    assert metric(fleet.metrics("a"), "zoo:peer_up", peer=cut) == 1


def test_a_hung_peer_fails_over_before_the_first_token(fleet: Fleet) -> None:
    """SIGSTOP: the peer's kernel still accepts and acknowledges, nothing answers. The poll finds
    it unreachable within seconds, and the request goes to the next peer before its first token
    (not after load_wait: the client's own timeout, 15 s, would end it first)."""
    alive = [h for h in ("b", "c", "d") if fleet.residents[h].proc.poll() is None]
    wait_until("a uses the first live peer", lambda: fleet.ask("a").host == alive[0], 20, every=0.5)
    os.killpg(fleet.residents[alive[0]].proc.pid, signal.SIGSTOP)
    try:
        answer = fleet.ask("a", timeout=15)
    finally:
        os.killpg(fleet.residents[alive[0]].proc.pid, signal.SIGCONT)
    assert (answer.status, answer.host) == (200, alive[1])
