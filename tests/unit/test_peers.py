"""Federation's foundation (issue #22): the index fields and their checks, the derived peer
table, the digest, and the choice of peer, all pure and checked against literal tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.support.index import SHA_A, SHA_B, SHA_C, write_index
from tests.support.peers import fleet, fleet_index
from zoo_agent.cli.main import cli
from zoo_agent.index.load import check_document
from zoo_agent.resident.router.peers import Peer, PeerHealth, choose_peer, peer_table, served_state, tenant_digest, undeclared
from zoo_agent.resident.wire.documents import Card


def test_the_fleet_is_valid_and_defaults_are_closed() -> None:
    idx = fleet_index(fleet())
    assert idx.tenants["chat"].overflow == "never"
    assert idx.hosts["edge"].endpoint is None and idx.hosts["edge"].accept_from_peers == []


def _with(path: str, value: Any) -> dict[str, Any]:
    doc = fleet()
    *parents, last = path.strip("/").split("/")
    node: Any = doc
    for part in parents:
        node = node[part]
    node[last] = value
    return doc


@pytest.mark.parametrize(("doc", "pointer", "message"), [
    (_with("/hosts/thor/endpoint", "ftp://thor.lan:8000"), "/hosts/thor/endpoint", "must start with 'http://' or 'https://', got 'ftp://thor.lan:8000'"),
    (_with("/hosts/thor/endpoint", "HTTP://thor.lan"), "/hosts/thor/endpoint", "must start with 'http://' or 'https://'"),
    (_with("/hosts/thor/endpoint", "thor.lan:8000"), "/hosts/thor/endpoint", "must start with 'http://' or 'https://'"),
    (_with("/hosts/thor/endpoint", "http://thor.lan:8000/v1"), "/hosts/thor/endpoint",
     "must be a base URL with no path, query or fragment (write 'http://thor.lan:8000'), got 'http://thor.lan:8000/v1'"),
    (_with("/hosts/thor/endpoint", "http://thor.lan:8000/"), "/hosts/thor/endpoint", "(write 'http://thor.lan:8000')"),
    (_with("/hosts/thor/endpoint", "http://thor.lan?x=1"), "/hosts/thor/endpoint", "no path, query or fragment"),
    (_with("/hosts/thor/endpoint", "http://admin:pw@thor.lan"), "/hosts/thor/endpoint", "must not carry a user or password"),
    (_with("/hosts/thor/endpoint", "http://thor.lan:99999"), "/hosts/thor/endpoint", "is not a URL (Port out of range 0-65535)"),
    (_with("/hosts/thor/endpoint", "http://thor.lan:0"), "/hosts/thor/endpoint", "port 0 cannot be reached"),
    (_with("/hosts/thor/endpoint", "http://"), "/hosts/thor/endpoint", "names no host"),
    (_with("/hosts/thor/endpoint", "http://thor .lan"), "/hosts/thor/endpoint", "must not contain whitespace"),
    (_with("/hosts/legion/endpoint", "http://THOR.lan:8000"), "/hosts/legion/endpoint", "is also the endpoint of /hosts/thor/endpoint; each host needs its own"),
    (_with("/hosts/thor/endpoint", "http://sprout.lan:80"), "/hosts/thor/endpoint", None),  # another port: another endpoint
    (_with("/hosts/sprout/endpoint", "http://thor.lan:8000"), "/hosts/sprout/endpoint", "is also the endpoint of /hosts/thor/endpoint"),
    (_with("/hosts/sprout/accept_from_peers", ["chat", "big"]), "/hosts/sprout/accept_from_peers/1",
     "host sprout does not serve tenant 'big' (it serves: chat); add it to /hosts/sprout/tenants or remove it here"),
    (_with("/hosts/sprout/accept_from_peers", ["chat", "chat"]), "/hosts/sprout/accept_from_peers/1", "lists tenant 'chat' again (already /hosts/sprout/accept_from_peers/0)"),
    (_with("/hosts/edge/accept_from_peers", ["chat"]), "/hosts/edge/accept_from_peers", "peers cannot reach host edge: set /hosts/edge/endpoint, or accept nothing"),
    (_with("/hosts/legion/accept_from_peers", []), "/tenants/big/overflow",
     "is 'peers', but no host other than thor accepts tenant 'big' from peers; list it in another host's accept_from_peers, or set 'never'"),
    (_with("/hosts/thor/accept_from_peers", ["chat"]), "/tenants/big/overflow", "no host other than legion accepts tenant 'big'"),
    (_with("/hosts/thor/endpoint", 8000), "/hosts/thor/endpoint", "expected string"),
    (_with("/tenants/chat/overflow", "always"), "/tenants/chat/overflow", 'expected one of "peers", "never", got "always"'),
])  # fmt: skip
def test_validation(doc: dict[str, Any], pointer: str, message: str | None) -> None:
    _, problems = check_document(doc)
    if message is None:
        assert problems == []
        return
    assert [p.pointer for p in problems] == [pointer], problems
    assert message in problems[0].message


def test_overflow_with_nobody_serving_or_accepting() -> None:
    doc = fleet()
    doc["tenants"]["lonely"] = {"model": "small", "overflow": "peers"}
    _, problems = check_document(doc)
    assert [(p.pointer, p.message) for p in problems] == [
        ("/tenants/lonely/overflow", "is 'peers', but no host accepts tenant 'lonely' from peers; list it in another host's accept_from_peers, or set 'never'")]


def test_a_bad_endpoint_is_one_line_through_the_cli(tmp_path: Path) -> None:
    path = write_index(tmp_path / "index.json", _with("/hosts/thor/endpoint", "http://thor.lan:8000/v1"))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2
    assert result.output == (f"{path}: /hosts/thor/endpoint: must be a base URL with no path, query or fragment (write 'http://thor.lan:8000'), "
                             "got 'http://thor.lan:8000/v1'\n")  # fmt: skip


def test_the_peer_table_is_derived_from_the_index() -> None:
    idx = fleet_index(fleet())
    chat, big = tenant_digest(idx, "chat"), tenant_digest(idx, "big")
    assert peer_table(idx, "thor") == {
        "chat": [Peer("sprout", "chat", "http://sprout.lan:8000", "small@v1", chat)],
        "big": [Peer("legion", "big", "https://10.0.0.7:8443", "large@v2", big)],
    }
    assert peer_table(idx, "edge") == {
        "chat": [Peer("thor", "chat", "http://thor.lan:8000", "small@v1", chat), Peer("sprout", "chat", "http://sprout.lan:8000", "small@v1", chat)],
        "big": [Peer("thor", "big", "http://thor.lan:8000", "large@v2", big), Peer("legion", "big", "https://10.0.0.7:8443", "large@v2", big)],
    }
    assert peer_table(idx, "not-in-the-index")["chat"][0].host == "thor"


def test_the_digest_covers_the_pinned_bytes_and_nothing_else() -> None:
    digest = tenant_digest(fleet_index(fleet()), "chat")
    assert digest.startswith("sha256:") and len(digest) == 71
    # Settings, descriptions, sources and the order of files and adapters do not count ...
    same = fleet()
    same["tenants"]["chat"].update(description="other words", generation={"temperature": 0})
    same["models"]["small"]["source"] = {"type": "url", "base_url": "https://mirror.lan/small"}
    same["models"]["small"]["description"] = "moved"
    assert tenant_digest(fleet_index(same), "chat") == digest
    # ... a version, a file's bytes, a file's name or an adapter do.
    for path, value in [("/models/small/version", "v1.1"), ("/loras/sql/version", "2"),
                        ("/models/small/files", [{"path": "model.safetensors", "sha256": SHA_B, "size": 10}]),
                        ("/models/small/files", [{"path": "weights.safetensors", "sha256": SHA_A, "size": 10}]),
                        ("/tenants/chat/loras", [])]:  # fmt: skip
        assert tenant_digest(fleet_index(_with(path, value)), "chat") != digest, path


def test_the_digest_is_canonical_json_of_the_pins() -> None:
    """Spelled out, so another implementation (or a peer's older agent) can compute it."""
    import hashlib

    canonical = ('{"loras":[{"files":[["model.safetensors","%s"]],"id":"sql","version":"1"}],'
                 '"model":{"files":[["model.safetensors","%s"]],"id":"small","version":"v1"}}') % (SHA_C, SHA_A)  # fmt: skip
    assert tenant_digest(fleet_index(fleet()), "chat") == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


A = Peer("a", "chat", "http://a:1", "small@v1", "sha256:x")
B = Peer("b", "chat", "http://b:1", "small@v1", "sha256:x")
C = Peer("c", "chat", "http://c:1", "small@v1", "sha256:x")


@pytest.mark.parametrize(("busy", "order"), [
    ({}, [A, B, C]),  # nothing polled yet: the table's order
    ({"a": 5, "b": 0, "c": 2}, [B, C, A]),  # least busy first
    ({"a": 1, "b": 1, "c": 0}, [C, A, B]),  # ties keep the table's order
    ({"a": 3}, [B, C, A]),  # not polled counts as idle
])  # fmt: skip
def test_least_busy_first(busy: dict[str, int], order: list[Peer]) -> None:
    health = PeerHealth()
    for peer in (A, B, C):
        if peer.host in busy:
            health = health.polled(peer, busy[peer.host])
    assert choose_peer([A, B, C], health, now=100.0) == order


def test_cooldown_after_more_than_allowed_fails_within_a_minute() -> None:
    health = PeerHealth(allowed_fails=2, cooldown_time=30.0)
    for t in (0.0, 1.0):
        health = health.failed(A, t)
        assert not health.cooling(A, t)  # allowed_fails failures are allowed
    health = health.failed(A, 2.0)  # the one too many
    assert health.cooling(A, 2.0) and health.cooldown_left(A, 12.0) == 20.0
    assert choose_peer([A, B], health, 12.0) == [B]
    assert not health.cooling(A, 32.0) and choose_peer([A, B], health, 32.0) == [A, B]  # back after cooldown_time
    assert health.failed(A, 33.0).cooling(A, 33.0) is False  # the count started over


def test_failures_a_minute_apart_or_between_successes_do_not_add_up() -> None:
    health = PeerHealth(allowed_fails=1, cooldown_time=30.0)
    health = health.failed(A, 0.0).failed(A, 61.0)
    assert not health.cooling(A, 61.0)  # the first is older than the window
    health = health.succeeded(A, 62.0).failed(A, 63.0)
    assert not health.cooling(A, 63.0)  # a success cleared the count
    assert health.failed(A, 64.0).cooling(A, 64.0)


def test_health_is_kept_per_tenant_at_a_host_and_is_a_value() -> None:
    other = Peer("a", "big", "http://a:1", "large@v2", "sha256:y")
    start = PeerHealth(allowed_fails=0)
    cooled = start.failed(A, 0.0)
    assert cooled.cooling(A, 0.0) and not cooled.cooling(other, 0.0)
    assert not start.cooling(A, 0.0)  # the old value is unchanged


@pytest.mark.parametrize(("card", "state"), [
    (None, "not served"),
    ({"id": "chat", "root": "small@v1", "x_zoo": {"model": "small@v1", "digest": "sha256:x"}}, "ok"),
    ({"id": "chat", "root": "small@v0", "x_zoo": {"model": "small@v0", "digest": "sha256:old"}}, "wrong version"),
    ({"id": "chat", "root": "small@v1", "x_zoo": {"model": "small@v1", "digest": "sha256:other"}}, "digest differs"),
    ({"id": "chat", "root": "small@v1", "x_zoo": {"model": "small@v1", "digest": None}}, "digest differs"),  # mid-swap: no digest vouched for
    ({"id": "chat", "root": "small@v1"}, "digest differs"),  # an agent from before issue #22, or another server
])  # fmt: skip
def test_served_state(card: dict[str, Any] | None, state: str) -> None:
    assert served_state("small@v1", "sha256:x", Card.model_validate(card) if card is not None else None) == state


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("chat", None),
        ("chat:sql", None),
        ("big", None),
        ("chat:nope", "'chat:nope': tenant 'chat' declares no adapter 'nope' (declared: sql)"),
        ("big:sql", "'big:sql': tenant 'big' declares no adapter 'sql' (declared: none)"),
        ("big:auto", "'big:auto': tenant 'big' declares no adapter 'auto' (declared: none)"),  # no adapter_selection
        ("big:", "'big:': tenant 'big' declares no adapter '' (declared: none)"),
        ("nobody", "'nobody' is not a tenant of the index"),
    ],
)
def test_a_name_the_index_does_not_declare_is_said_so_before_any_peer_is_asked(name: str, says: str | None) -> None:
    assert undeclared(fleet_index(fleet()), name) == says
