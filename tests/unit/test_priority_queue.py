"""Priority classes and the waiting queue (issue #20): pure, literal-input tables."""

from __future__ import annotations

import subprocess
import sys

import pytest

from zoo_agent.resident.priority import CLASSES, BadPriority, PriorityNotAllowed, PriorityQueue, class_name, for_peer, grant, parse_priority, rank


@pytest.mark.parametrize(
    ("header", "field", "default", "expected"),
    [
        (None, None, 0, 0),  # nothing named: the tenant's default
        (None, None, 1, 1),
        ("realtime", None, 1, -1),
        ("System", None, 0, -2),  # names are case-insensitive, padding ignored
        (" batch ", None, 0, 1),
        ("default", None, 1, 0),
        (None, 5, 0, 5),  # vLLM's integer, as is
        (None, -2, 0, -2),  # as good as system, and no better
        (None, 1000, 0, 1000),
        (None, 0, 1, 0),  # an explicit 0 is not "unset"
        ("batch", -2, 0, 1),  # the header wins over the body's field
    ],
)
def test_parse_priority(header: str | None, field: int | None, default: int, expected: int) -> None:
    assert parse_priority(header, field, default) == expected


@pytest.mark.parametrize(
    ("header", "field", "param", "words"),
    [
        ("urgent", None, "X-Zoo-Priority", ["X-Zoo-Priority", "'urgent'", "system, realtime, default, batch"]),
        ("", None, "X-Zoo-Priority", ["X-Zoo-Priority", "system"]),
        ("-1", None, "X-Zoo-Priority", ["X-Zoo-Priority"]),  # the header takes names only
        (None, 1001, "priority", ["priority", "-2..1000"]),
        (None, -3, "priority", ["priority", "-2..1000"]),  # ranked above system: no such class (issue #31)
        (None, -1000, "priority", ["priority", "-2..1000"]),
        (None, True, "priority", ["priority", "not an integer"]),
    ],
)
def test_a_bad_priority_names_its_param_and_what_is_allowed(header: str | None, field: int | None, param: str, words: list[str]) -> None:
    with pytest.raises(BadPriority) as raised:
        parse_priority(header, field, 0)
    assert raised.value.param == param
    assert isinstance(raised.value, ValueError)
    for word in words:
        assert word in str(raised.value)


@pytest.mark.parametrize(
    ("header", "field", "default", "privileged", "expected"),
    [
        (None, None, -1, False, -1),  # a realtime tenant's own class needs no key: naming none gets it
        ("realtime", None, -1, False, -1),  # nor does naming it
        ("default", None, 0, False, 0),
        ("batch", None, 0, False, 1),
        (None, 0, 0, False, 0),
        (None, 7, 1, False, 7),
        ("system", None, 0, True, -2),  # the priority key grants every class
        (None, -2, 1, True, -2),
        ("default", None, -1, False, 0),  # lower than the tenant's own: always allowed
    ],
)
def test_grant(header: str | None, field: int | None, default: int, privileged: bool, expected: int) -> None:
    assert grant(header, field, default, privileged) == expected


@pytest.mark.parametrize(
    ("header", "field", "default", "param"),
    [
        ("system", None, 0, "X-Zoo-Priority"),
        ("Realtime", None, 0, "X-Zoo-Priority"),
        ("system", None, -1, "X-Zoo-Priority"),  # better than the tenant's own realtime
        (None, -1, 0, "priority"),
        (None, -1, 1, "priority"),
        (None, -2, -1, "priority"),
    ],
)
def test_above_default_without_the_priority_key_is_not_allowed(header: str | None, field: int | None, default: int, param: str) -> None:
    with pytest.raises(PriorityNotAllowed) as raised:
        grant(header, field, default, privileged=False)
    assert raised.value.param == param and "--priority-key-file" in str(raised.value) and isinstance(raised.value, BadPriority)


def test_a_route_may_name_no_better_than_its_worst_candidates_own() -> None:
    """A route whose first candidate is realtime and whose fallback is default: naming realtime would carry it to the fallback."""
    assert grant(None, None, -1, privileged=False, own=0) == -1  # naming none: the first candidate's own, as before
    with pytest.raises(PriorityNotAllowed, match="default or lower"):
        grant("realtime", None, -1, privileged=False, own=0)
    assert grant("realtime", None, -1, privileged=True, own=0) == -1


def test_a_peer_is_asked_for_at_most_default() -> None:
    assert [for_peer(p) for p in (None, -2, -1, 0, 1, 500)] == [None, "default", "default", "default", "batch", "batch"]


@pytest.mark.parametrize(
    ("priority", "name"),
    [(-1000, "system"), (-2, "system"), (-1, "realtime"), (0, "default"), (1, "batch"), (7, "batch"), (1000, "batch")],
)
def test_class_name_is_the_nearest_class(priority: int, name: str) -> None:
    assert class_name(priority) == name


def test_classes_are_on_vllms_scale() -> None:
    assert list(CLASSES) == ["system", "realtime", "default", "batch"]  # best first
    assert sorted(CLASSES.values()) == list(CLASSES.values()) and CLASSES["default"] == 0


@pytest.mark.parametrize(
    ("priority", "waited", "aging", "expected"),
    [(1, 0.0, 10.0, 1.0), (1, 10.0, 10.0, 0.0), (1, 25.0, 10.0, -1.5), (0, 5.0, 0.0, 0.0), (0, 5.0, -1.0, 0.0), (-1, 3.0, 1.0, -4.0)],
)
def test_rank_ages_one_class_per_aging_seconds(priority: int, waited: float, aging: float, expected: float) -> None:
    assert rank(priority, waited, aging) == expected


def drain(queue: PriorityQueue[str]) -> list[str]:
    return [queue.pop_best() for _ in range(len(queue))]


def test_best_class_first_and_fifo_within_a_class() -> None:
    q: PriorityQueue[str] = PriorityQueue(aging_seconds=0)
    for i, (name, priority) in enumerate([("b1", 1), ("d1", 0), ("b2", 1), ("r1", -1), ("d2", 0), ("s1", -2), ("r2", -1)]):
        q.push(name, priority, float(i))
    assert q.counts_by_class() == {"system": 1, "realtime": 2, "default": 2, "batch": 2}
    assert list(q) == ["s1", "r1", "r2", "d1", "d2", "b1", "b2"]  # iteration is the order of service, and takes nothing
    assert drain(q) == ["s1", "r1", "r2", "d1", "d2", "b1", "b2"]
    assert len(q) == 0 and q.counts_by_class() == dict.fromkeys(CLASSES, 0)


def test_equal_arrivals_stay_fifo() -> None:
    q: PriorityQueue[str] = PriorityQueue(aging_seconds=10)
    for name in "abcde":
        q.push(name, 0, 5.0)
    assert drain(q) == list("abcde")


@pytest.mark.parametrize(
    ("fresh_arrival", "first"),
    [
        (5.0, "default"),  # the batch request waited half a class: the fresh default one goes first
        (10.0, "batch"),  # a class's worth of waiting: a tie, and the older one wins
        (30.0, "batch"),
    ],
)
def test_an_aged_batch_request_overtakes_a_fresh_default_one(fresh_arrival: float, first: str) -> None:
    q: PriorityQueue[str] = PriorityQueue(aging_seconds=10)
    q.push("batch", 1, 0.0)
    q.push("default", 0, fresh_arrival)
    assert q.pop_best() == first


def test_batch_is_never_starved_by_a_stream_of_realtime_requests() -> None:
    """Realtime requests arriving every second: the batch one, two classes worse, waits about 2 x aging_seconds."""
    q: PriorityQueue[str] = PriorityQueue(aging_seconds=5)
    q.push("batch", 1, 0.0)
    served = []
    for t in range(30):
        q.push(f"r{t}", -1, float(t))
        served.append(q.pop_best())  # one served per second
    assert served.index("batch") == 10  # at t=10 its rank ties the fresh realtime one's, and it arrived first


def test_aging_off_never_lets_batch_through() -> None:
    q: PriorityQueue[str] = PriorityQueue(aging_seconds=0)
    q.push("batch", 1, 0.0)
    q.push("default", 0, 1e9)
    assert q.pop_best() == "default"


def test_changing_aging_reorders_what_waits() -> None:
    q: PriorityQueue[str] = PriorityQueue(aging_seconds=0)
    q.push("batch", 1, 0.0)
    q.push("default", 0, 100.0)
    assert list(q) == ["default", "batch"]
    q.aging_seconds = 10
    assert q.aging_seconds == 10 and list(q) == ["batch", "default"]


def test_a_deferred_item_pushed_back_with_its_arrival_keeps_its_place() -> None:
    q: PriorityQueue[str] = PriorityQueue(aging_seconds=10)
    for i, name in enumerate(["a", "b", "c"]):
        q.push(name, 0, float(i))
    assert q.pop_best() == "a"
    q.push("a", 0, 0.0)
    assert drain(q) == ["a", "b", "c"]


def test_remove_by_identity() -> None:
    q: PriorityQueue[object] = PriorityQueue()
    items = [object() for _ in range(4)]
    for i, item in enumerate(items):
        q.push(item, i % 2, float(i))
    assert q.remove(items[1]) and not q.remove(items[1]) and not q.remove(object())
    assert len(q) == 3 and q.counts_by_class()["batch"] == 1
    assert [q.pop_best() for _ in range(3)] == [items[0], items[2], items[3]]
    with pytest.raises(IndexError):
        q.pop_best()


def test_priority_is_pure() -> None:
    """The router reuses it without the [resident] extra: no torch comes in with it."""
    code = "import sys, zoo_agent.resident.priority; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
