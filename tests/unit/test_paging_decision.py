"""The paging decision (pure) and the control protocol's framing (issue #20)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from zoo_agent.resident.wire import control as p
from zoo_agent.resident.config import WorkerConfig
from zoo_agent.resident.paging import Evict, Live, Load, Refuse, Wait, decide, expired

G = 1 << 30


def live(tenant: str, gib: float, *, pinned: bool = False, busy: bool = False, evictable: bool = True, used: float = 0.0, loaded: float = 0.0,
         draining: bool = False) -> Live:  # fmt: skip
    return Live(tenant, int(gib * G), pinned, busy or draining, evictable and not draining, used, loaded, draining)


@pytest.mark.parametrize(
    ("budget", "workers", "need", "expected"),
    [
        (None, [live("a", 100)], 100, Load()),  # no budget: nothing to prove
        (8, [], 8, Load()),  # exactly the budget fits
        (8, [live("a", 3)], 5, Load()),
        (8, [], 9, Refuse),  # cannot fit even alone
        (8, [live("a", 6, pinned=True)], 3, Refuse),  # pinned tenants leave too little
        (8, [live("a", 3, used=5), live("b", 3, used=1)], 4, Evict(("b",))),  # least recently used
        (8, [live("a", 3, used=5), live("b", 3, used=1)], 7, Evict(("b", "a"))),  # as many as it takes, LRU first
        (8, [live("a", 3, used=1, busy=True), live("b", 3, used=5)], 4, Evict(("b",))),  # busy: never, however old
        (8, [live("a", 3, busy=True), live("b", 3, busy=True)], 4, Wait),  # room comes when they finish
        (8, [live("a", 3, evictable=False), live("b", 3, pinned=True)], 4, Wait),  # loading or draining: its memory is in use
        (8, [live("a", 2, pinned=True), live("b", 3, used=9), live("c", 3, used=2)], 3, Evict(("c",))),
        # An evicted worker still exiting: its memory is coming back; evicting the next idle one too would page it out for nothing.
        (8, [live("a", 3, draining=True), live("b", 3, used=1)], 4, Wait),
        (8, [live("a", 1, draining=True), live("b", 3, used=1), live("c", 3, used=2)], 4, Evict(("b",))),  # not enough coming back
    ],
)
def test_decide(budget: int | None, workers: list[Live], need: float, expected: object) -> None:
    decision = decide(budget * G if budget else None, workers, "new", int(need * G))
    if isinstance(expected, type):
        assert isinstance(decision, expected)
    else:
        assert decision == expected


@pytest.mark.parametrize(
    ("budget", "workers", "need", "expected"),
    [
        (None, [live("a", 1), live("b", 1, used=1)], 1, Load()),  # under the cap
        (None, [live("a", 1, used=5), live("b", 1, used=1), live("c", 1, used=3)], 1, Evict(("b",))),  # at the cap: LRU idle
        (None, [live("a", 1, used=1, busy=True), live("b", 1, used=5), live("c", 1, used=3)], 1, Evict(("c",))),  # busy: never
        (None, [live("a", 1, pinned=True), live("b", 1, used=5), live("c", 1, used=3)], 1, Evict(("c",))),  # pinned: never
        (None, [live("a", 1, busy=True), live("b", 1, busy=True), live("c", 1, evictable=False)], 1, Wait),
        (None, [live("a", 1, pinned=True), live("b", 1, pinned=True), live("c", 1, pinned=True)], 1, Refuse),
        (None, [live("a", 1), live("b", 1), live("c", 1, draining=True)], 1, Load()),  # a draining one no longer counts
        (None, [live("a", 1), live("b", 1), live("new", 1, evictable=False)], 1, Load()),  # a reload beside: one tenant
        # Both limits: the cap asks for one, the budget for two; the LRU pair goes.
        (8, [live("a", 3, used=1), live("b", 3, used=2), live("c", 1, used=3)], 6, Evict(("a", "b"))),
        # The budget has room, the cap does not: one goes although memory was free.
        (100, [live("a", 3, used=1), live("b", 3, used=2), live("c", 1, used=3)], 4, Evict(("a",))),
    ],
)
def test_decide_under_max_loaded_3(budget: int | None, workers: list[Live], need: float, expected: object) -> None:
    """max_loaded (issue #34, OLLAMA_MAX_LOADED_MODELS) beside the memory budget."""
    decision = decide(budget * G if budget else None, workers, "new", int(need * G), max_loaded=3)
    if isinstance(expected, type):
        assert isinstance(decision, expected), decision
    else:
        assert decision == expected


def test_a_cap_the_pinned_fill_is_refused_naming_them() -> None:
    decision = decide(None, [live("a", 1, pinned=True), live("b", 1, pinned=True)], "new", G, max_loaded=2)
    assert decision == Refuse("new cannot load: the pinned tenants (a, b) fill max_loaded (2)")
    busy = decide(None, [live("a", 1, pinned=True), live("b", 1, busy=True)], "new", G, max_loaded=2)
    assert isinstance(busy, Wait) and "2 tenants are loaded, max_loaded is 2" in busy.reason and "(b)" in busy.reason


def test_refusal_names_the_numbers() -> None:
    decision = decide(4 * G, [live("a", 3, pinned=True)], "big", 2 * G)
    assert isinstance(decision, Refuse)
    assert "big needs 2.1 GB" in decision.reason and "pinned tenants hold 3.2 GB of the 4.3 GB budget" in decision.reason


def test_oldest_policy_evicts_the_first_loaded_even_if_it_is_hot() -> None:
    workers = [live("hot", 3, used=9, loaded=1), live("cold", 3, used=2, loaded=5)]
    assert decide(8 * G, workers, "new", 4 * G, "lru") == Evict(("cold",))
    assert decide(8 * G, workers, "new", 4 * G, "oldest") == Evict(("hot",))


def test_protocol_round_trip_and_unknown_messages() -> None:
    config = WorkerConfig(tenant="t", model="m", version="v1", version_dir="/zoo/models/m/versions/v1")  # type: ignore[arg-type]
    for message in (p.Configure(config=config), p.Ping(seq=3), p.Drain(), p.Reloads(ok=1, failed=2)):
        assert p.to_worker(p.encode(message)) == message
    for reply in (p.Loading(pct=40), p.Failed(error="x"), p.Ready(pid=1, load_seconds=0.5, device="cpu", dtype="float32"), p.Pong(seq=3)):
        assert p.to_supervisor(p.encode(reply)) == reply
    with pytest.raises(ValidationError):
        p.to_supervisor(b'{"pong": 3}\n')  # the untyped shape of before: refused, not guessed
    with pytest.raises(ValidationError):
        p.to_worker(p.encode(p.Pong(seq=1)))  # a message of the other direction


def test_lines_reassembles_split_messages() -> None:
    lines = p.Lines()
    data = p.encode(p.Ping(seq=1)) + p.encode(p.Ping(seq=2))
    assert lines.feed(data[:5]) == []
    got = lines.feed(data[5:])
    assert [p.to_worker(line) for line in got] == [p.Ping(seq=1), p.Ping(seq=2)]


def test_expired_names_only_idle_unpinned_serving_workers_past_their_keep_alive() -> None:
    """keep_alive (issue #34): idle since the later of its last request and its load; never pinned, busy, loading or draining."""
    def kept(tenant: str, keep: float | None, **kw: object) -> Live:
        return Live(tenant, G, keep_alive=keep, **kw)  # type: ignore[arg-type]

    workers = [
        kept("idle", 300, last_used=100),
        kept("fresh", 300, last_used=150),  # used 250 s ago
        kept("reloaded", 300, last_used=10, loaded_at=200),  # loaded again since: idle since its load
        kept("never", None, last_used=0),
        kept("pinned", 300, pinned=True),
        kept("busy", 300, busy=True),
        kept("loading", 300, evictable=False),
        kept("draining", 300, draining=True),
        kept("zero", 0, last_used=399),
    ]
    assert expired(workers, 400.0) == ("idle", "zero")
    assert expired(workers, 399.9) == ("zero",)  # exactly keep_alive: expired; a moment before: not
