"""The router's view of its peers (issue #22), fed real httpx responses through httpx's own
MockTransport: a peer's answers are input, so a malformed, oversized or refusing one must
leave that peer unused, never "ok" by default; a new pin forgets what the last poll said."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("prometheus_client", reason="the resident extra is not installed")

import httpx  # noqa: E402
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402

from zoo_agent.resident.federation import MAX_POLL_BYTES, Federation  # noqa: E402
from zoo_agent.resident.peers import Peer  # noqa: E402

PEER = Peer("b", "big", "http://b.test:8000", "m2@v1", "sha256:" + "ab" * 32)


def _federation(handler: Callable[[httpx.Request], httpx.Response], registry: CollectorRegistry | None = None) -> Federation:
    fed = Federation("a", "fleet-secret", registry or CollectorRegistry())
    fed.table = {"big": [PEER]}
    fed.clients[PEER.endpoint] = httpx.AsyncClient(base_url=PEER.endpoint, transport=httpx.MockTransport(handler))
    return fed


def _answers(card: Any = None, health: Any = None, status: int = 200) -> Callable[[httpx.Request], httpx.Response]:
    good = {"id": "big", "object": "model", "root": PEER.model, "x_zoo": {"state": "serving", "model": PEER.model, "digest": PEER.digest}}
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/health":
            return httpx.Response(200, json=health if health is not None else {"state": "ready", "tenants": {"big": {"running": 2, "waiting": 1}}})
        return httpx.Response(status, json={"object": "list", "data": [good if card is None else card]})

    handler.seen = seen  # type: ignore[attr-defined]
    return handler


def _poll(fed: Federation, times: int = 1) -> None:
    async def run() -> None:
        for _ in range(times):
            await fed.poll()
        await fed.close()

    asyncio.run(run())


def test_a_peer_serving_the_pins_is_a_candidate_with_its_load_and_our_fleet_key() -> None:
    handler = _answers()
    fed = _federation(handler)
    _poll(fed)
    assert fed.candidates("big") == [PEER]
    assert fed.health.busy[PEER.key] == 3
    request = handler.seen[0]  # type: ignore[attr-defined]
    assert request.headers["authorization"] == "Bearer fleet-secret" and request.headers["x-zoo-peer"] == "a"
    assert fed.report() == {"b": {"state": "ok", "reason": None, "busy": 3, "tenants": {"big": "ok"}}}


@pytest.mark.parametrize(
    ("card", "state", "reason"),
    [
        ({"id": "big", "root": "m2@v0", "x_zoo": {"model": "m2@v0", "digest": PEER.digest}}, "refused",
         "wrong version (m2@v0; the index pins m2@v1)"),
        ({"id": "big", "root": "m2@v1", "x_zoo": {"model": "m2@v1", "digest": "sha256:" + "cd" * 32}}, "refused", "digest differs"),
        ({"id": "other"}, "refused", "not served"),
        ({"id": "big", "root": "m2@v1", "x_zoo": None}, "refused", "digest differs"),  # a null x_zoo never vouches
        ({"id": "big", "root": "m2@v1", "x_zoo": "ok"}, "refused", "digest differs"),
    ],
)
def test_a_peer_that_serves_anything_else_is_refused(card: dict[str, Any], state: str, reason: str) -> None:
    fed = _federation(_answers(card))
    _poll(fed)
    assert fed.candidates("big") == []
    assert fed.report()["b"]["state"] == state and fed.report()["b"]["reason"] == reason
    assert fed.unusable("big") == [f"b: {state} ({reason})"]


def test_a_malformed_or_oversized_answer_leaves_the_peer_unused_even_after_it_was_ok() -> None:
    answers = {"body": b"", "ok": True}

    def handler(request: httpx.Request) -> httpx.Response:
        if answers["ok"]:
            return _answers()(request)
        return httpx.Response(200, content=answers["body"])

    fed = _federation(handler)
    _poll(fed)
    assert fed.candidates("big") == [PEER]
    for body in (b"[1, 2]", b'{"data": [{"id": "big", "x_zoo": [1]}]}', b"not json", b" " * (MAX_POLL_BYTES + 1)):
        answers.update(ok=False, body=body)
        fed.clients[PEER.endpoint] = httpx.AsyncClient(base_url=PEER.endpoint, transport=httpx.MockTransport(handler))
        _poll(fed)
        assert fed.candidates("big") == [], body[:40]


def test_a_refused_fleet_key_and_an_unreachable_host_say_so_and_cool_down() -> None:
    fed = _federation(_answers(status=401))
    _poll(fed)
    assert fed.report()["b"]["state"] == "refused" and fed.report()["b"]["reason"] == "refused our fleet key (401)"

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    fed = _federation(down)
    _poll(fed, times=fed.health.allowed_fails + 1)  # one failure too many within a minute
    assert fed.report()["b"]["state"] == "unreachable" and fed.health.cooling(PEER, time.monotonic())
    assert "peers: b unreachable (ConnectError)" == fed.summary()


def test_a_new_pin_forgets_what_the_last_poll_said() -> None:
    fed = _federation(_answers())
    _poll(fed)
    assert fed.candidates("big") == [PEER]
    newer = Peer("b", "big", PEER.endpoint, "m2@v2", "sha256:" + "ef" * 32)
    fed.table = {"big": [newer]}  # what take_index does when the index pins v2
    assert fed.candidates("big") == [] and fed.report()["b"]["state"] == "unknown"


def test_the_metrics_count_refusals_once_per_change() -> None:
    registry = CollectorRegistry()
    fed = _federation(_answers({"id": "big", "root": "m2@v0", "x_zoo": {"model": "m2@v0", "digest": PEER.digest}}), registry)
    _poll(fed, times=3)
    text = generate_latest(registry)
    assert b'zoo:peer_refusals_total{peer="b",reason="wrong_version",tenant="big"} 1.0' in text
    json.dumps(fed.report())  # /health's peers is JSON


HUGE = Peer("b", "huge", PEER.endpoint, "m3@v1", "sha256:" + "12" * 32)


def _card(peer: Peer, model: str | None = None) -> dict[str, Any]:
    return {"id": peer.tenant, "root": model or peer.model, "x_zoo": {"model": model or peer.model, "digest": peer.digest}}


def test_a_refusal_for_one_tenant_gives_up_only_that_tenants_attempts_at_the_host() -> None:
    """Mid-rollout b moved `huge` to another version: what b is answering for `big` goes on (issue #31)."""
    cards = [_card(PEER), _card(HUGE, "m3@v2")]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"state": "ready", "tenants": {}})
        return httpx.Response(200, json={"object": "list", "data": cards})

    fed = _federation(handler)
    fed.table = {"big": [PEER], "huge": [HUGE]}

    async def run() -> tuple[asyncio.Future[str], asyncio.Future[str]]:
        big, huge = fed.watch(PEER), fed.watch(HUGE)
        await fed.poll()
        return big, huge

    big, huge = asyncio.run(run())
    assert not big.done() and huge.result() == "refused (wrong version (m3@v2; the index pins m3@v1))"
    fed.unwatch(PEER, big)
    assert fed.watchers == {}  # nothing kept for an attempt that ended

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    fed.clients[PEER.endpoint] = httpx.AsyncClient(base_url=PEER.endpoint, transport=httpx.MockTransport(down))

    async def unreachable() -> tuple[str, str]:
        big, huge = fed.watch(PEER), fed.watch(HUGE)
        await fed.poll()
        return big.result(), huge.result()

    assert asyncio.run(unreachable()) == ("unreachable (ConnectError)", "unreachable (ConnectError)")  # the host itself: every tenant's


def test_a_deep_answer_to_a_poll_is_no_answer_not_a_recursion_error() -> None:
    deep = b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    fed = _federation(lambda request: httpx.Response(200, content=deep))
    _poll(fed)
    assert fed.candidates("big") == [] and fed.report()["b"]["reason"] == "not served"


def test_refused_peers_have_a_gauge_from_the_start_for_the_alert() -> None:
    from tests.support.peers import fleet, fleet_index

    registry = CollectorRegistry()
    fed = Federation("sprout", "fleet-secret", registry)
    fed.take_index(fleet_index(fleet()))
    text = generate_latest(registry).decode()
    for peer, tenant in (("thor", "chat"), ("thor", "big"), ("legion", "big")):
        assert f'zoo:peer_refused{{peer="{peer}",tenant="{tenant}"}} 0.0' in text
    assert 'zoo:peer_up{peer="thor"} 0.0' in text
    smaller = fleet()
    smaller["hosts"]["legion"]["accept_from_peers"], smaller["tenants"]["big"]["overflow"] = [], "never"
    fed.take_index(fleet_index(smaller))  # legion is no one's peer any more: its series go with it
    text = generate_latest(registry).decode()
    assert 'peer="legion"' not in text and 'zoo:peer_refused{peer="thor",tenant="big"} 0.0' in text

    fed = _federation(_answers({"id": "big", "root": "m2@v0", "x_zoo": {"model": "m2@v0", "digest": PEER.digest}}), registry := CollectorRegistry())
    _poll(fed)
    assert 'zoo:peer_refused{peer="b",tenant="big"} 1.0' in generate_latest(registry).decode()


def test_a_503_names_a_peer_it_tried_once() -> None:
    fed = _federation(_answers())
    _poll(fed)
    for _ in range(fed.health.allowed_fails + 1):
        fed.failed(PEER)  # the one too many cools it down
    assert fed.unusable("big") == ["b: cooling down 5s"]
    assert fed.unusable("big", besides={"b"}) == []  # already named with what it answered


def test_what_a_peer_says_of_itself_is_repeated_short_and_printable() -> None:
    """Its served model goes into the log, /health and Status:; a newline there would forge a log line."""
    card = {"id": "big", "root": "x", "x_zoo": {"model": "m2@v0\nWARNING forged line" + "x" * 500, "digest": PEER.digest}}
    fed = _federation(_answers(card))
    _poll(fed)
    reason = fed.report()["b"]["reason"]
    assert "\n" not in reason and reason.startswith("wrong version (m2@v0?WARNING forged line") and len(reason) < 200
