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
from zoo_agent.resident.cgroups import WorkerCgroups
from zoo_agent.resident.config import ResidentConfig, WorkerConfig
from zoo_agent.resident.pager import Pager
from zoo_agent.resident.process import WorkerProcess
from zoo_agent.resident.reload import Reloader
from zoo_agent.resident.slots import GROWTH_NOISE, Order, Outcome, Slot, SlotTable, Worker
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
        self.started.append(f"{slot.tenant}{' (standby)' if standby else ''}{' (incoming)' if incoming else ''}")
        if self.strict:
            self.verifying.add(slot.tenant)
            return
        worker = Worker(FakeProcess(), config, standby=standby)
        if incoming:
            slot.incoming = worker
        else:
            slot.serving = worker

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
    """Records the action log's page-in and page-out records."""

    def __init__(self) -> None:
        self.gap_from: dict[str, str] = {}
        self.actions: list[str] = []

    def paged(self, action: str, slot: Slot, label: str, *, reason: str = "", **_: Any) -> None:
        self.actions.append(f"{action} {slot.tenant}" + (f" reason={reason}" if reason else ""))


class FakeLauncher:
    def worker_config(self, idx: Index, tid: str) -> WorkerConfig:
        return _config(tid)


class FakeNotify:
    def status(self, text: str) -> bool:
        return True


def _pager(budget_gib: float | None, sizes: dict[str, float], *, pinned: tuple[str, ...] = (),
           keep_alive: dict[str, float] | None = None, max_loaded: int | None = None) -> tuple[Pager, FakeCrew, FakeRouter]:  # fmt: skip
    table = SlotTable(budget=int(budget_gib * G) if budget_gib else None, order=list(sizes), max_loaded=max_loaded)
    for tid, gib in sizes.items():
        table.slots[tid] = Slot(tid, estimate=int(gib * G), pinned=tid in pinned, keep_alive=(keep_alive or {}).get(tid))
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


def test_keep_alive_unloads_a_worker_idle_that_long_and_never_a_pinned_or_busy_one() -> None:
    """Issue #34, with fake time: page-out reason=idle in the action log, counted as an idle eviction."""
    pager, crew, router = _pager(None, {"pin": 1, "chat": 1, "busy": 1, "forever": 1}, pinned=("pin",),
                                 keep_alive={"pin": 60, "chat": 60, "busy": 60})  # fmt: skip
    for tid in ("pin", "chat", "busy", "forever"):
        _ask(pager, tid, 10)
    pager.page(10)
    for tid in ("pin", "chat", "busy", "forever"):
        _ready(pager.table.slots[tid], 11)
    pager.table.slots["chat"].last_used = 30  # served a request at 30
    pager.table.slots["busy"].inflight = 1  # a long generation, since 11
    pager.page(89)
    assert crew.retiring == []  # chat idle 59 s: kept
    pager.page(90)
    assert [s.tenant for s, _ in crew.retiring] == ["chat"]
    assert pager.reports.actions == ["page-out chat reason=idle"] and "evicted chat idle" in router.events  # type: ignore[attr-defined]
    pager.page(10_000)
    assert [s.tenant for s, _ in crew.retiring] == ["chat"], "a pinned, busy or keep-alive-less tenant was unloaded"
    pager.table.slots["busy"].inflight, pager.table.slots["busy"].last_used = 0, 10_000  # its request ended now
    pager.page(10_059)
    assert [s.tenant for s, _ in crew.retiring] == ["chat"]
    pager.page(10_060)
    assert [s.tenant for s, _ in crew.retiring] == ["chat", "busy"]
    assert pager.table.slots["chat"].phase == "draining" and not pager.table.slots["chat"].wanted  # not loaded again by itself
    _exit(crew)
    pager.page(20_000)
    assert crew.started == ["pin", "chat", "busy", "forever"]


def test_max_loaded_pages_out_the_least_recently_used_without_a_budget() -> None:
    pager, crew, router = _pager(None, {"a": 1, "b": 1, "c": 1}, max_loaded=2)
    for t, tid in enumerate(("a", "b"), start=1):
        _ask(pager, tid, t)
        pager.page(t)
        _ready(pager.table.slots[tid], t)
    pager.table.slots["a"].last_used = 5  # a was used after b
    _ask(pager, "c", 6)
    pager.page(6)
    assert [s.tenant for s, _ in crew.retiring] == ["b"] and "evicted b budget" in router.events
    assert crew.started == ["a", "b", "c (standby)"]


# -- an operator's load and unload (issue #34) ---------------------------------------------------------------
def _order(pager: Pager, action: str, tid: str, t: float, *, evict: bool = False) -> Order:
    """The router's side: an order put in the table; the pager takes it at its next tick."""
    order = Order(action, tid, evict=evict, asked=t)  # type: ignore[arg-type]
    assert pager.table.ask(order)
    pager.page(t)
    return order


def _outcome(order: Order) -> Outcome | None:
    return order.done.result(0) if order.done.done() else None


def _loaded(pager: Pager, *tenants: str) -> None:
    for t, tid in enumerate(tenants, start=1):
        _ask(pager, tid, t)
        pager.page(t)
        _ready(pager.table.slots[tid], t)


def test_unload_drains_a_busy_tenant_and_answers_once_its_worker_exited() -> None:
    pager, crew, router = _pager(None, {"a": 1, "b": 1})
    _loaded(pager, "a", "b")
    a = pager.table.slots["a"]
    worker = a.serving
    assert worker is not None
    a.inflight = 1  # a request in flight: it completes (the worker drains), then the worker exits
    order = _order(pager, "unload", "a", 10)
    assert worker.state == "draining" and [s.tenant for s, _ in crew.retiring] == ["a"] and _outcome(order) is None
    assert "forget fake.sock" not in router.events  # its connection carries the request in flight
    assert pager.reports.actions == ["page-out a reason=unload"]  # type: ignore[attr-defined]
    pager.page(11)
    assert _outcome(order) is None  # still draining
    _exit(crew)
    pager.page(12)
    outcome = _outcome(order)
    assert outcome is not None and outcome.status == 200 and outcome.state == "paged_out" and "a unloaded in 2.0s" in outcome.message
    assert not a.wanted and crew.started == ["a", "b"]  # not loaded again by itself


@pytest.mark.parametrize(("tid", "status", "code", "fragment"), [
    ("pin", 409, "pinned", "tenant 'pin' is pinned: it is never unloaded"),
    ("ghost", 404, "model_not_found", "tenant 'ghost' is not served by this host"),
    ("out", 200, None, "out is not loaded"),
])  # fmt: skip
def test_unload_refuses_a_pinned_or_unknown_tenant_and_says_when_there_is_nothing_to_do(tid: str, status: int, code: str | None,
                                                                                       fragment: str) -> None:  # fmt: skip
    pager, crew, _ = _pager(None, {"pin": 1, "out": 1}, pinned=("pin",))
    _loaded(pager, "pin")
    order = _order(pager, "unload", tid, 5)
    outcome = _outcome(order)
    assert outcome is not None and (outcome.status, outcome.code) == (status, code) and fragment in outcome.message
    assert crew.retiring == []


def test_load_answers_once_its_worker_serves_and_counts_keep_alive_from_then() -> None:
    pager, crew, _ = _pager(None, {"a": 1}, keep_alive={"a": 60})
    order = _order(pager, "load", "a", 100)
    assert crew.started == ["a"] and _outcome(order) is None
    _ready(pager.table.slots["a"], 103)
    pager.page(104)
    outcome = _outcome(order)
    assert outcome is not None and outcome.status == 200 and outcome.message == "a loaded in 4.0s"
    pager.page(162)
    assert crew.retiring == []  # idle since its load at 103
    again = _order(pager, "load", "a", 162)
    assert _outcome(again) == Outcome(200, "a is loaded", "serving")
    pager.page(221)
    assert crew.retiring == []  # asked again at 162: kept till 222
    pager.page(222)
    assert [s.tenant for s, _ in crew.retiring] == ["a"]


def test_a_load_that_would_page_out_idle_tenants_is_refused_naming_them_unless_it_says_evict() -> None:
    pager, crew, router = _pager(4, {"a": 2, "b": 2, "c": 3})
    _loaded(pager, "a", "b")
    refused = _order(pager, "load", "c", 10)
    outcome = _outcome(refused)
    assert outcome is not None and (outcome.status, outcome.code, outcome.evicted) == (409, "would_evict", ("a", "b"))
    assert outcome.message == "loading c would page out a, b to make room; ask again with evict to do it"
    pager.page(11)
    assert crew.retiring == [] and crew.started == ["a", "b"] and not pager.table.slots["c"].wanted  # nothing changed
    order = _order(pager, "load", "c", 12, evict=True)
    assert [s.tenant for s, _ in crew.retiring] == ["a", "b"] and "evicted a budget" in router.events
    _exit(crew)
    pager.page(13)
    _ready(pager.table.slots["c"], 14)
    pager.page(15)
    outcome = _outcome(order)
    assert outcome is not None and outcome.status == 200 and outcome.evicted == ("a", "b") and "paging out a, b" in outcome.message


def test_a_load_that_cannot_fit_is_refused_saying_why() -> None:
    pager, crew, _ = _pager(4, {"pin": 3, "big": 2}, pinned=("pin",))
    _loaded(pager, "pin")
    outcome = _outcome(_order(pager, "load", "big", 10, evict=True))
    assert outcome is not None and (outcome.status, outcome.code) == (409, "does_not_fit") and "pinned tenants hold" in outcome.message
    assert crew.started == ["pin"]


def test_an_order_whose_waiter_gave_up_is_dropped() -> None:
    pager, crew, _ = _pager(None, {"a": 1})
    order = _order(pager, "load", "a", 1)
    assert order.done.cancel() and pager.pending
    pager.page(2)
    assert pager.pending == [] and crew.started == ["a"]  # the load goes on; nobody is told


# -- a reload under the budget (issue #34) -------------------------------------------------------------------
def _reloader(pager: Pager, crew: FakeCrew) -> Reloader:
    return Reloader(crew, pager.table, pager.config, None, FakeLauncher(), pager, pager.reports, FakeNotify())  # type: ignore[arg-type]


def test_a_reload_that_cannot_fit_beside_pages_out_an_idle_tenant_instead_of_stopping_the_old_version() -> None:
    pager, crew, router = _pager(6, {"a": 2, "b": 2, "c": 2})
    _loaded(pager, "a", "b", "c")
    c = pager.table.slots["c"]
    old = c.serving
    assert old is not None
    _reloader(pager, crew)._swap(c, _config("c").model_copy(update={"version": "v2"}))
    assert [s.tenant for s, _ in crew.retiring] == ["a"] and "evicted a budget" in router.events  # least recently used
    assert c.serving is old and c.path == old.path and c.phase == "serving"  # the old version keeps serving: no request waits
    assert c.incoming is not None and c.incoming.standby and crew.started[-1] == "c (standby) (incoming)"
    pager.page(10)
    assert c.incoming.process.told == []  # a still exiting: its memory is in use
    assert [s.tenant for s, _ in crew.retiring] == ["a"]  # and neither c's old version nor b is paged out for it
    _exit(crew)
    pager.page(11)
    assert c.incoming.process.told == ["proceed"] and not c.incoming.standby


def test_a_reload_with_nothing_idle_to_page_out_stops_the_old_version_first() -> None:
    pager, crew, _ = _pager(6, {"a": 2, "b": 2, "c": 2})
    _loaded(pager, "a", "b", "c")
    for tid in ("a", "b"):
        pager.table.slots[tid].inflight = 1
    c = pager.table.slots["c"]
    _reloader(pager, crew)._swap(c, _config("c").model_copy(update={"version": "v2"}))
    assert [s.tenant for s, _ in crew.retiring] == ["c"] and c.incoming is None and c.path is None and c.wanted


def test_a_new_version_that_no_longer_fits_fails_its_reload_and_the_old_one_serves_on() -> None:
    pager, crew, _ = _pager(6, {"a": 2, "b": 2, "c": 2})
    _loaded(pager, "a", "b", "c")
    c = pager.table.slots["c"]
    _reloader(pager, crew)._swap(c, _config("c").model_copy(update={"version": "v2"}))
    _exit(crew)
    c.estimate = 7 * G  # the index changed meanwhile: it can never fit
    incoming = c.incoming
    pager.page(10)
    assert incoming is not None and incoming.process.told == ["kill"] and "c needs" in incoming.error
    assert c.serving is not None and c.serving.state == "serving" and c.refusal is None


# -- measured, not estimated (issue #34) ----------------------------------------------------------------------
def _measured(slot: Slot, gib: float, device: str = "cpu") -> None:
    """Its worker's live readings (what ``Workers.measure`` leaves) that make its model hold ``gib``:
    on CPU, half a GiB of weights at load and the rest grown since (past the noise); on CUDA, device memory."""
    worker = slot.serving
    assert worker is not None
    worker.ready = p.Ready(pid=1, load_seconds=1.0, device=device, dtype="float32", weights_bytes=G // 2)
    worker.baseline = 2 * G  # runtime, weights, warm-up: not the model's alone
    if device.startswith("cuda"):
        worker.device_bytes, worker.ram = int(gib * G), 10 * G  # the budget counts device memory on a CUDA host
    else:
        worker.ram = worker.baseline + int((gib - 0.5) * G) + GROWTH_NOISE


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_the_pager_decides_with_what_a_worker_holds_when_it_is_above_the_estimate(device: str) -> None:
    pager, crew, router = _pager(4, {"a": 1, "b": 1, "c": 1})
    _loaded(pager, "a", "b")
    _measured(pager.table.slots["b"], 2.5, device)  # a long prompt, a leak, the engine's own buffers: 2.5 GiB, estimated 1
    assert pager.table.slots["b"].footprint == int(2.5 * G)
    _ask(pager, "c", 6)
    pager.page(6)
    assert [s.tenant for s, _ in crew.retiring] == ["a"]  # 1 + 2.5 + 1 > 4: the least recently used makes room
    assert "evicted a budget" in router.events  # estimated, all three (3 GiB) would have fitted


def test_a_measurement_below_the_estimate_changes_nothing() -> None:
    pager, crew, _ = _pager(4, {"a": 1, "b": 1, "c": 2.5})
    _loaded(pager, "a", "b")
    _measured(pager.table.slots["b"], 0.25)
    _ask(pager, "c", 6)
    pager.page(6)
    assert [s.tenant for s, _ in crew.retiring] == ["a"]  # b counts its estimate (1 + 1 + 2.5 > 4), not the 0.25 measured


def test_workers_measure_what_a_serving_worker_holds_on_a_bounded_cadence(workers: Any) -> None:
    """Fake readers: read once it serves (its baseline: runtime, weights, warm-up), then every
    measure_interval (5 s here), not only once after load; what it grows by counts past the noise."""
    ram = {"now": 2 * G}
    reads: list[tuple[int, Any]] = []

    def read_ram(pid: int, cgroup: Any) -> int | None:
        reads.append((pid, cgroup))
        return ram["now"]

    workers.ram, workers.device = read_ram, lambda pid, own: None if own is None else own + 1
    slot = Slot("a", estimate=G)
    workers.start(None, slot, _config("a"))
    worker = slot.serving
    workers.check(slot, worker, 50.0)
    assert reads == []  # loading: not measured
    worker.state, worker.progressed, worker.ping_sent = "serving", 100.0, 100.0
    worker.ready = p.Ready(pid=4242, load_seconds=1.0, device="cpu", dtype="float32", weights_bytes=G // 2)
    workers.check(slot, worker, 100.0)
    assert (worker.baseline, worker.ram, worker.live, slot.footprint) == (2 * G, 2 * G, G // 2, G)  # the estimate counts
    ram["now"] = 2 * G + GROWTH_NOISE + 3 * G  # a long prompt, a leak: 3 GiB past the noise
    workers.check(slot, worker, 104.0)
    assert worker.ram == 2 * G and len(reads) == 1  # within the cadence: not read again
    worker.stats = p.Pong(seq=1, device_bytes=5 * G)
    workers.check(slot, worker, 105.0)
    assert worker.live == G // 2 + 3 * G and slot.footprint == G // 2 + 3 * G and worker.device_bytes == 5 * G + 1
    worker.ready = p.Ready(pid=4242, load_seconds=1.0, device="cuda:0", dtype="float16")
    assert slot.footprint == 5 * G + 1  # on a CUDA device the budget is device memory


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
    w = Workers(config, FakeLaunch(), selectors.DefaultSelector(), lambda slot, worker, e: events.append((slot.tenant, e.type)), lambda: None,  # type: ignore[arg-type]
                cgroups=WorkerCgroups(None, "a unit test"))  # fmt: skip
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


class _HupCrew(FakeCrew):
    """A crew whose index is read again on HUP (``hup`` asks for it; the pager never does)."""

    def load_index(self) -> Index:
        return object()  # type: ignore[return-value]  # FakeLauncher ignores it

    def take_index(self, idx: Index) -> None:
        pass


class _V2Launcher:
    def worker_config(self, idx: Index, tid: str) -> WorkerConfig:
        return _config(tid).model_copy(update={"version": "v2"})


class _HupReports(FakeReports):
    def state(self) -> None:
        pass


class _HupNotify(FakeNotify):
    def reloading(self, text: str) -> bool:
        return True


def test_a_reload_that_pages_out_a_tenant_it_also_changes_skips_that_one_and_still_completes() -> None:
    """The soak found it: a HUP changing a and b, where a's new version fits only once b is paged out.
    b paged out has no old version to swap (the supervisor died on ``assert old is not None``); it
    loads the new config when next asked, and the reload completes with a's swap alone."""
    table = SlotTable(budget=4 * G, order=["a", "b"])
    for tid in ("a", "b"):
        table.slots[tid] = Slot(tid, estimate=2 * G)
    crew = _HupCrew(table, idx=object())  # type: ignore[arg-type]
    config = ResidentConfig(root=Path("/zoo"), index=Path("/zoo/index.json"), host="h")
    reports = _HupReports()
    pager = Pager(crew, table, config, None, FakeLauncher(), FakeRouter(), reports, FakeNotify())  # type: ignore[arg-type]
    _loaded(pager, "a", "b")
    reloader = Reloader(crew, table, config, None, _V2Launcher(), pager, reports, _HupNotify())  # type: ignore[arg-type]
    reloader.hup()
    a, b = table.slots["a"], table.slots["b"]
    assert [s.tenant for s, _ in crew.retiring] == ["b"] and b.serving is None  # paged out for a's new version
    assert a.incoming is not None and a.incoming.config.version == "v2" and a.serving is not None  # a swaps beside its old one
    assert reloader.pending == {"a"}
    reloader.done("a", ok=True)
    assert reloader.reloads == 1 and not reloader.pending
