"""Admission with fake workers (issue #32): a slot table, no processes, no torch, no sockets.

A slot whose ``path`` is set is a loaded worker (the path is all the router forwards to);
``None`` is a tenant paged out or loading. The clock is the test's: aging is arithmetic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from zoo_agent.resident.router.admission import Admission, QueueFull, Unavailable
from zoo_agent.resident.slots import Slot, SlotTable


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _admission(*slots: Slot, aging: float = 10.0) -> tuple[Admission, SlotTable, Clock, list[str]]:
    woken: list[str] = []
    table = SlotTable(slots={s.tenant: s for s in slots}, order=[s.tenant for s in slots], wake=lambda: woken.append("wake"))
    clock = Clock()
    return Admission(table, aging_seconds=aging, load_wait=5.0, clock=clock), table, clock, woken


def _run(test: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(test(), 10))


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_a_loaded_worker_with_room_gives_a_place_at_once() -> None:
    adm, table, _, woken = _admission(Slot("a", capacity=2, path="/w/a", phase="serving"))

    async def go() -> None:
        assert await adm.place("a", 0) == "/w/a"
        assert table.slots["a"].inflight == 1 and not woken
        adm.release("a")
        assert table.slots["a"].inflight == 0

    _run(go)


def test_a_free_place_is_taken_without_waiting_and_none_while_it_is_full_unloaded_or_others_wait() -> None:
    """``free``: the router's common case (a loaded worker with room) with no task and no wait (issue #32: the hop)."""
    adm, table, clock, woken = _admission(Slot("a", capacity=1, path="/w/a", phase="serving"), Slot("b", capacity=2))
    clock.t = 1234.0
    assert adm.free("a") == "/w/a" and table.slots["a"].inflight == 1 and table.slots["a"].last_used == 1234.0
    assert adm.free("a") is None and table.slots["a"].inflight == 1  # full: place() queues it or says 429
    assert adm.free("b") is None and adm.free("nobody") is None and not woken  # not loaded, not served: place() decides

    async def go() -> None:
        adm.release("a")
        waiting = asyncio.ensure_future(adm.place("b", 0))
        await _settle()
        table.slots["b"].path = "/w/b"
        assert adm.free("b") is None  # one waits for b: it is served first
        adm.pump("b")
        assert await waiting == "/w/b" and adm.free("b") == "/w/b" and table.slots["b"].inflight == 2

    _run(go)


def test_waiters_are_served_best_priority_first_then_in_arrival_order() -> None:
    adm, table, clock, woken = _admission(Slot("a", capacity=8))
    served: list[str] = []

    async def go() -> None:
        async def ask(name: str, priority: int) -> None:
            await adm.place("a", priority)
            served.append(name)

        tasks = []
        for name, priority in [("batch", 1), ("default-1", 0), ("realtime", -1), ("default-2", 0), ("system", -2)]:
            tasks.append(asyncio.ensure_future(ask(name, priority)))
            await _settle()
            clock.t += 0.001
        slot = table.slots["a"]
        assert slot.queued == 5 and slot.wanted and woken  # the supervisor was told someone waits
        slot.path, slot.capacity = "/w/a", 1  # loaded, with room for one at a time
        adm.pump("a")
        for _ in range(5):
            await _settle()
            adm.release("a")
        await asyncio.gather(*tasks)

    _run(go)
    assert served == ["system", "realtime", "default-1", "default-2", "batch"]


def test_a_request_that_waited_long_enough_passes_a_better_class() -> None:
    adm, table, clock, _ = _admission(Slot("a", capacity=4), aging=10.0)
    served: list[str] = []

    async def go() -> None:
        async def ask(name: str, priority: int) -> None:
            await adm.place("a", priority)
            served.append(name)

        old = asyncio.ensure_future(ask("batch, 25 s ago", 1))
        await _settle()
        clock.t += 25  # 2.5 classes of aging: it now ranks before a fresh realtime request
        new = asyncio.ensure_future(ask("realtime, now", -1))
        await _settle()
        table.slots["a"].path, table.slots["a"].capacity = "/w/a", 1
        adm.pump("a")
        await _settle()
        adm.release("a")
        await asyncio.gather(old, new)

    _run(go)
    assert served == ["batch, 25 s ago", "realtime, now"]


def test_a_full_queue_is_a_429_and_a_full_worker_too() -> None:
    adm, table, _, _ = _admission(Slot("a", capacity=2, phase="loading"), Slot("b", capacity=1, path="/w/b", phase="serving"))

    async def go() -> None:
        waiting = [asyncio.ensure_future(adm.place("a", 0)) for _ in range(2)]
        await _settle()
        with pytest.raises(QueueFull, match="loading and 2 requests already wait") as full:
            await adm.place("a", 0)
        assert (full.value.status, full.value.code, full.value.kind) == (429, "queue_full", "server_error")
        assert await adm.place("b", 0) == "/w/b"
        with pytest.raises(QueueFull, match="at capacity"):
            await adm.place("b", 0)
        for task in waiting:  # their clients leave: the queue empties
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert table.slots["a"].queued == 0

    _run(go)


def test_a_refused_tenant_answers_who_waits_and_who_comes() -> None:
    adm, table, _, _ = _admission(Slot("a", capacity=2, phase="loading"))

    async def go() -> None:
        waiting = asyncio.ensure_future(adm.place("a", 0))
        await _settle()
        table.slots["a"].refusal = "tenant 'a' does not fit in the memory budget"
        adm.pump("a")
        with pytest.raises(Unavailable, match="does not fit") as refused:
            await waiting
        assert (refused.value.status, refused.value.code) == (503, "model_unavailable")
        with pytest.raises(Unavailable, match="does not fit"):
            await adm.place("a", 0)
        with pytest.raises(Unavailable, match="not served by this host"):
            await adm.place("nobody", 0)

    _run(go)


def test_a_failed_tenant_is_tried_again_by_a_new_request() -> None:
    adm, table, _, woken = _admission(Slot("a", capacity=2, phase="failed", refusal="its load failed"))

    async def go() -> None:
        waiting = asyncio.ensure_future(adm.place("a", 0))
        await _settle()
        assert table.slots["a"].refusal is None and table.slots["a"].wanted and woken
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)

    _run(go)


def test_stopping_answers_every_waiter() -> None:
    adm, _, _, _ = _admission(Slot("a", capacity=2, phase="loading"))

    async def go() -> None:
        waiting = asyncio.ensure_future(adm.place("a", 0))
        await _settle()
        adm.stopping = True
        for tenant in adm.waiting():
            adm.pump(tenant)
        with pytest.raises(Unavailable, match="stopping"):
            await waiting

    _run(go)


def test_a_place_given_as_its_client_leaves_is_given_back() -> None:
    adm, table, _, _ = _admission(Slot("a", capacity=1, phase="loading"))

    async def go() -> None:
        waiting = asyncio.ensure_future(adm.place("a", 0))
        await _settle()
        table.slots["a"].path = "/w/a"
        adm.pump("a")  # the place is given ...
        waiting.cancel()  # ... as the client leaves, before its task ran again
        await asyncio.gather(waiting, return_exceptions=True)
        assert table.slots["a"].inflight == 0

    _run(go)


def test_overflow_to_peers_when_at_capacity_or_when_it_does_not_fit() -> None:
    adm, table, _, _ = _admission(Slot("a", capacity=1, path="/w/a", phase="serving"), Slot("b", capacity=1, phase="paged_out"))
    assert adm.overflows("a") is None  # room: it is served here
    table.slots["a"].inflight = 1
    assert adm.overflows("a") == "at capacity (1 running and waiting)"
    assert adm.overflows("b") is None  # paged out, and it fits: it waits here for its load
    table.slots["b"].blocked = "busy tenants hold the memory"
    assert adm.overflows("b") == "does not fit now (busy tenants hold the memory)"
    assert adm.overflows("nobody") is None


def test_a_waiting_streaming_client_is_told_what_its_tenant_does() -> None:
    adm, _, _, _ = _admission(Slot("a", capacity=1, phase="fetching", fetch_pct=40))
    said: list[str] = []

    async def comment(text: str) -> None:
        said.append(text)

    async def go() -> str | None:
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        placing = asyncio.ensure_future(adm.place("a", 0))
        return await adm.wait(placing, gone, "a", comment, seconds=0.01)

    with pytest.raises(TimeoutError):
        _run(go)
    assert adm.phase("a") == "fetching 40%" and adm.phase("nobody") == "gone"


def test_a_loaded_worker_gets_no_more_than_its_capacity_from_the_queue() -> None:
    adm, table, _, _ = _admission(Slot("a", capacity=2, phase="loading"))

    async def go() -> None:
        asks = [asyncio.ensure_future(adm.place("a", 0)) for _ in range(2)]
        await _settle()
        slot = table.slots["a"]
        slot.path, slot.inflight = "/w/a", 1  # loaded, one place already taken (a request that came as it loaded)
        adm.pump("a")
        await _settle()
        assert [t.done() for t in asks] == [True, False] and slot.inflight == 2 and slot.queued == 1
        adm.release("a")  # an answer ended: the next waiter takes its place
        await _settle()
        assert asks[1].done() and slot.inflight == 2 and slot.queued == 0

    _run(go)
