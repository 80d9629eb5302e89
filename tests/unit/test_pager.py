"""The pager and the worker machinery with fake processes (issue #32): no torch, no process, no socket.

The pager is handed a fake crew (the supervisor's narrow face), as Ollama's scheduler tests hand
theirs a fake ``loadFn``: what it starts, drains and refuses is recorded, and a worker "exits"
when the test says so. ``Workers`` is driven with a fake ``WorkerProcess`` that records what it
was told.
"""

from __future__ import annotations

import selectors
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from zoo_agent.index.model import Index
from zoo_agent.resident.config import ResidentConfig, WorkerConfig
from zoo_agent.resident.pager import Pager
from zoo_agent.resident.process import WorkerProcess
from zoo_agent.resident.slots import Slot, SlotTable, Worker
from zoo_agent.resident.wire import control as p
from zoo_agent.resident.workers import Workers

G = 1 << 30


class FakeProcess(WorkerProcess):
    """Records what it is told; ``code`` is its exit status once the test ends it."""

    def __init__(self, path: str = "fake.sock") -> None:
        self.path = path
        self.told: list[str] = []
        self.code: int | None = None
        self.events: list[p.ToSupervisor] = []

    @property
    def pid(self) -> int:
        return 4242

    def poll(self) -> int | None:
        return self.code

    def wait(self, timeout: float | None = None) -> int:
        return self.code or 0

    def terminate(self) -> None:
        self.told.append("terminate")

    def kill(self) -> None:
        self.told.append("kill")
        self.code = -9

    def fileno(self) -> int | None:
        return None  # nothing to wait on: looked at every tick

    def read(self) -> list[p.ToSupervisor] | None:
        events, self.events = self.events, []
        return events

    def ping(self, seq: int) -> bool:
        self.told.append(f"ping {seq}")
        return True

    def proceed(self) -> bool:
        self.told.append("proceed")
        return True

    def drain(self) -> bool:
        self.told.append("drain")
        return True

    def set_adapters(self, adapters: Any) -> bool:
        return False

    def tell_reloads(self, ok: int, failed: int) -> None:
        pass

    def close(self) -> None:
        self.told.append("close")


def _config(tid: str) -> WorkerConfig:
    return WorkerConfig(tenant=tid, model=tid, version="v1", version_dir=Path("/zoo") / tid)  # type: ignore[arg-type]


@dataclass
class FakeCrew:
    """The supervisor as the pager sees it; ``verifying`` holds starts that wait for --strict's hash."""

    table: SlotTable
    idx: Index | None = None
    retiring: list[tuple[Slot, Worker]] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    verifying: set[str] = field(default_factory=set)
    strict: bool = False

    def start(self, slot: Slot, config: WorkerConfig, *, standby: bool = False, incoming: bool = False) -> None:
        self.started.append(f"{slot.tenant}{' (standby)' if standby else ''}")
        if self.strict:
            self.verifying.add(slot.tenant)
            return
        slot.serving = Worker(FakeProcess(), config, standby=standby)

    def preparing(self, slot: Slot) -> bool:
        return slot.tenant in self.verifying

    def drain(self, slot: Slot, worker: Worker, why: str) -> None:
        worker.state = "draining"
        self.retiring.append((slot, worker))
        if slot.serving is worker:
            slot.serving = None

    def load_index(self) -> Index:
        raise AssertionError("not asked of the pager")

    def take_index(self, idx: Index) -> None:
        raise AssertionError("not asked of the pager")

    def reindex(self) -> None:
        pass

    def status_line(self) -> str:
        return "status"

    def wake(self) -> None:
        pass


class FakeRouter:
    def __init__(self) -> None:
        self.events: list[str] = []

    def evicted(self, tenant: str, reason: str) -> None:
        self.events.append(f"evicted {tenant} {reason}")

    def poke(self, tenant: str) -> None:
        self.events.append(f"poke {tenant}")

    def forget(self, path: str) -> None:
        self.events.append(f"forget {path}")


class FakeReports:
    gap_from: dict[str, str] = {}

    def paged(self, action: str, slot: Slot, label: str, **_: Any) -> None:
        pass


class FakeLauncher:
    def worker_config(self, idx: Index, tid: str) -> WorkerConfig:
        return _config(tid)


class FakeNotify:
    def status(self, text: str) -> bool:
        return True


def _pager(budget_gib: float | None, sizes: dict[str, float], *, pinned: tuple[str, ...] = ()) -> tuple[Pager, FakeCrew, FakeRouter]:
    table = SlotTable(budget=int(budget_gib * G) if budget_gib else None, order=list(sizes))
    for tid, gib in sizes.items():
        table.slots[tid] = Slot(tid, estimate=int(gib * G), pinned=tid in pinned)
    crew = FakeCrew(table, idx=object())  # type: ignore[arg-type]  # the pager only hands it on
    router = FakeRouter()
    config = ResidentConfig(root=Path("/zoo"), index=Path("/zoo/index.json"), host="h")
    pager = Pager(crew, table, config, None, FakeLauncher(), router, FakeReports(), FakeNotify())  # type: ignore[arg-type]
    return pager, crew, router


def _ask(pager: Pager, tid: str, t: float) -> None:
    """A request arrives for ``tid`` (what the router does under the lock)."""
    slot = pager.table.slots[tid]
    slot.wanted, slot.last_used = True, t


def _ready(slot: Slot, t: float) -> None:
    """Its worker reported ready (what the supervisor does on the Ready event)."""
    assert slot.serving is not None
    slot.serving.state, slot.phase, slot.wanted, slot.loaded_at, slot.path = "serving", "serving", False, t, slot.serving.path


def _exit(crew: FakeCrew) -> None:
    """The drained workers exit (what the supervisor's reaping does)."""
    for slot, _ in crew.retiring:
        slot.phase = "paged_out"
    crew.retiring.clear()


def test_a_third_tenant_evicts_the_least_recently_used_idle_one_then_loads_when_its_memory_is_back() -> None:
    pager, crew, router = _pager(4, {"a": 2, "b": 2, "c": 2})
    for t, tid in enumerate(("a", "b"), start=1):
        _ask(pager, tid, t)
        pager.page(t)
        _ready(pager.table.slots[tid], t)
    _ask(pager, "c", 6)
    pager.page(6)
    assert crew.started == ["a", "b", "c (standby)"]  # c's runtime starts while a exits; its weights wait
    assert [s.tenant for s, _ in crew.retiring] == ["a"]
    assert "evicted a budget" in router.events
    pager.page(7)  # a still exiting: its memory is in use; nothing more is evicted
    assert [s.tenant for s, _ in crew.retiring] == ["a"] and pager.table.slots["c"].serving.process.told == []  # type: ignore[union-attr]
    _exit(crew)
    pager.page(8)
    assert pager.table.slots["c"].serving.process.told == ["proceed"]  # type: ignore[union-attr]


def test_a_busy_tenant_is_never_evicted_the_new_one_waits_saying_why() -> None:
    pager, crew, _ = _pager(4, {"a": 2, "b": 2, "c": 2})
    for t, tid in enumerate(("a", "b"), start=1):
        _ask(pager, tid, t)
        pager.page(t)
        _ready(pager.table.slots[tid], t)
        pager.table.slots[tid].inflight = 1
    _ask(pager, "c", 3)
    pager.page(3)
    assert crew.started == ["a", "b"] and crew.retiring == []
    assert "c" in pager.table.slots["c"].blocked


def test_a_tenant_being_verified_holds_its_memory_before_it_has_a_process() -> None:
    """--strict hashes beside the loop: the slot counts as loading, so a second tenant cannot be
    placed in the same memory meanwhile (it waits, then evicts nobody busy)."""
    pager, crew, _ = _pager(3, {"a": 2, "b": 2})
    crew.strict = True
    _ask(pager, "a", 1)
    pager.page(1)
    assert crew.started == ["a"] and pager.table.slots["a"].serving is None and pager.table.slots["a"].phase == "loading"
    _ask(pager, "b", 2)
    pager.page(2)
    assert crew.started == ["a"], "b was placed in the memory a is about to take"


def test_pinned_first_then_priority_then_least_recently_asked() -> None:
    pager, crew, _ = _pager(None, {"low": 1, "high": 1, "pin": 1, "old": 1}, pinned=("pin",))
    pager.table.slots["high"].priority = -1
    for tid, t in (("low", 5), ("high", 9), ("old", 1)):
        _ask(pager, tid, t)
    pager.page(10)
    assert crew.started == ["pin", "high", "old", "low"]


def test_a_tenant_that_cannot_fit_alone_is_refused_and_its_waiters_told() -> None:
    pager, crew, router = _pager(2, {"big": 3})
    _ask(pager, "big", 1)
    pager.page(1)
    slot = pager.table.slots["big"]
    assert crew.started == [] and slot.refusal is not None and "big needs" in slot.refusal and not slot.wanted
    assert "poke big" in router.events


# -- Workers: probing and reaping with a fake process -----------------------------------------------------
class FakeLaunch:
    def __init__(self) -> None:
        self.made: list[FakeProcess] = []

    def spawn(self, config: WorkerConfig, *, standby: bool = False) -> FakeProcess:
        self.made.append(FakeProcess(f"{config.tenant}.sock"))
        return self.made[-1]


@pytest.fixture
def workers() -> Any:
    events: list[tuple[str, str]] = []
    config = ResidentConfig(root=Path("/zoo"), index=Path("/zoo/index.json"), host="h", ping_interval=5, ping_timeout=10)
    w = Workers(config, FakeLaunch(), selectors.DefaultSelector(), lambda slot, worker, e: events.append((slot.tenant, e.type)), lambda: None)  # type: ignore[arg-type]
    w.events = events  # type: ignore[attr-defined]
    return w


def test_a_serving_worker_is_pinged_when_quiet_and_killed_when_it_stays_silent(workers: Any) -> None:
    slot = Slot("a")
    workers.start(None, slot, _config("a"))
    worker = slot.serving
    worker.state, worker.progressed = "serving", 0.0
    assert workers.check(slot, worker, 4.0) is None and worker.process.told == []  # progressed recently enough
    workers.check(slot, worker, 5.0)
    assert worker.process.told == ["ping 1"]
    worker.process.events.append(p.Pong(seq=1, served=3))
    workers.check(slot, worker, 6.0)  # its events are read every tick (nothing to wait on)
    assert workers.events == [("a", "pong")] and worker.progressed > 0
    workers.events.clear()
    worker.ping_sent, worker.progressed = 20.0, 20.0  # asked again at 20, never answered
    workers.check(slot, worker, 31.0)
    assert worker.process.told[-1] == "kill" and worker.killed_for == "hang"


def test_a_drained_worker_is_reaped_with_its_exit_status_and_released(workers: Any) -> None:
    slot = Slot("a")
    workers.start(None, slot, _config("a"))
    worker = slot.serving
    workers.drain(slot, worker)
    assert slot.serving is None and worker.state == "draining" and worker.process.told == ["drain"]
    assert workers.reap() == []
    worker.process.code = 0
    assert workers.reap() == [(slot, worker, 0)] and workers.retiring == []
    workers.closed(slot, worker)
    assert worker.process.told[-1] == "close"
