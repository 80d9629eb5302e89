"""What the supervisor knows of each tenant and each worker process (issue #20).

A ``Slot`` is one tenant the host serves, loaded or not, with an explicit ``phase`` the
supervisor's tick switches on; a ``Worker`` is one process serving it. The ``SlotTable`` is
the one object the supervisor and the router share (issue #32): the router reads and writes
the few fields it shares with the supervisor under ``SlotTable.lock``, and asks the
supervisor's loop to look again with ``SlotTable.wake``; it is never handed the supervisor.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from zoo_agent.resident.config import WorkerConfig
from zoo_agent.resident.process import WorkerProcess
from zoo_agent.resident.wire import control as p

__all__ = ["GROWTH_NOISE", "MAX_ORDERS", "Order", "Outcome", "Phase", "Slot", "SlotTable", "Worker"]

#: RAM a worker may grow by once serving before it counts (issue #34): its allocator's arenas and caches
#: move by megabytes; a model that outgrows its estimate does by hundreds.
GROWTH_NOISE = 64 << 20

Phase = Literal["paged_out", "fetching", "loading", "serving", "draining", "failed"]


@dataclass
class Worker:
    """One worker process and what the supervisor knows of it (the process itself: ``process``)."""

    process: WorkerProcess
    config: WorkerConfig
    started: float = field(default_factory=time.monotonic)
    state: Literal["loading", "serving", "draining"] = "loading"
    pct: int = 0
    progressed: float = field(default_factory=time.monotonic)  # last loading progress or pong
    ping_sent: float = 0.0
    ping_seq: int = 0
    stats: p.Pong = field(default_factory=lambda: p.Pong(seq=0))
    ready: p.Ready | None = None
    error: str = ""
    killed_for: str = ""  # why the supervisor killed it ("hang"), if it did
    standby: bool = False  # its runtime starts, its weights wait for Proceed (the budget's room)
    fd: int | None = None  # what the supervisor's selector waits on for its events (None: none, or no longer)
    cgroup: Path | None = None  # its own cgroup (with a memory limit), where the resident may make one (issue #34)
    ram: int | None = None  # RAM the process holds (its cgroup's working set, else RSS), read live; None: not read
    device_bytes: int | None = None  # device memory it holds, read live; None: none, or not read
    baseline: int | None = None  # ``ram`` at its first reading once serving: runtime, weights, warm-up
    measured_at: float = 0.0  # monotonic, the last reading

    @property
    def live(self) -> int:
        """What its model holds, measured (0: not measured): on a CUDA device, the device memory it holds;
        else the weights it reported at load plus what the process grew by since (less ``GROWTH_NOISE``:
        allocator arenas and caches): its runtime (Python, torch) is not the model's, and not the budget's."""
        if self.ready is not None and self.ready.device.startswith("cuda"):
            return self.device_bytes or 0
        if self.ram is None or self.baseline is None:
            return 0
        return (self.ready.weights_bytes if self.ready else 0) + max(0, self.ram - self.baseline - GROWTH_NOISE)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def path(self) -> str:
        """Its private socket, where the router forwards."""
        return self.process.path


@dataclass
class Slot:
    """One tenant this host serves, loaded or not. Fields the router reads or writes
    (``path``, ``inflight``, ``queued``, ``wanted``, ``refusal``, ``last_used``) change under the lock."""

    tenant: str
    pinned: bool = False
    priority: int = 0
    fetch: Literal["eager", "on-demand"] = "eager"
    capacity: int = 32  # requests the worker holds at once (max_batch + max_queue); the router holds as many while it loads
    estimate: int = 0  # footprint from the index and config.json
    measured: int = 0  # footprint the loaded model reported (max of its loads)
    phase: Phase = "paged_out"
    serving: Worker | None = None
    incoming: Worker | None = None  # a new version loading beside the serving one
    path: str | None = None  # where to forward now: the serving worker, unless draining
    inflight: int = 0
    queued: int = 0
    wanted: bool = False
    refusal: str | None = None  # why requests for it are answered 503 now
    blocked: str = ""  # why it waits to load (paging: busy tenants hold the memory)
    last_used: float = 0.0
    loaded_at: float = 0.0
    crashes: list[float] = field(default_factory=list)
    restart_at: float = 0.0
    fetch_pct: int = 0
    pins: str = ""  # on-demand: what a fetch makes current under the loaded index (ondemand.pins)
    fetched: str = ""  # the pins of the last fetch: never fetched again until on disk, or asked again after a failure
    fetch_failed: str = ""  # the pins whose fetch failed: failed (and shown) until a request or an index change asks again
    error: str = ""
    served_before: int = 0  # requests and tokens of this tenant's workers that are gone
    tokens_before: int = 0
    evictions: int = 0
    keep_alive: float | None = None  # seconds idle before its worker is unloaded (the index's keep_alive; None: never)
    # A remote tenant (backend 'openai', issue #36): "<model> at <host>". It has no worker and is never
    # paged; the router (``router/remote.py``) keeps its phase, path and refusal by its health polls.
    remote: str = ""

    @property
    def footprint(self) -> int:
        """What the budget counts: the larger of the estimate, what its loads reported, and what its workers hold now."""
        return max(self.estimate, self.measured, *(w.live for w in self.workers))

    @property
    def busy(self) -> bool:
        return self.inflight > 0 or self.queued > 0

    @property
    def workers(self) -> list[Worker]:
        return [w for w in (self.serving, self.incoming) if w is not None]


#: Orders asked and not answered yet: the router refuses more (429), so what waits stays bounded.
MAX_ORDERS = 64


@dataclass(frozen=True)
class Outcome:
    """How an order ended: the HTTP status the router answers with, and what it says."""

    status: int
    message: str
    state: str = ""  # the tenant's phase when it ended
    code: str | None = None  # the error's code (4xx, 5xx): "would_evict", "pinned", ...
    evicted: tuple[str, ...] = ()  # what a load paged out to make room


@dataclass
class Order:
    """An operator's load or unload of one tenant (``POST /models/load|unload``, ``zoo-agent resident
    load|unload``; issue #34): put in the table by the router, carried out by the supervisor's loop
    (the pager), answered through ``done`` when it is done, whichever thread waits for it."""

    action: Literal["load", "unload"]
    tenant: str
    evict: bool = False  # a load may page out idle tenants to make room
    asked: float = field(default_factory=time.monotonic)
    done: Future[Outcome] = field(default_factory=Future)

    def answer(self, outcome: Outcome) -> None:
        """Once; a waiter that gave up (cancelled) is not told."""
        if not self.done.done() and self.done.set_running_or_notify_cancel():
            self.done.set_result(outcome)


def _no_wake() -> None:
    """A table with no supervisor loop to wake (a unit test's)."""


@dataclass
class SlotTable:
    """The host's tenants, what the supervisor and the router share: ``slots`` change under ``lock``;
    ``order`` (the tenants as the index lists them), ``budget`` and ``max_loaded`` are replaced whole
    by the supervisor when it takes an index; ``wake`` tells the supervisor's loop a request waits."""

    slots: dict[str, Slot] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    order: list[str] = field(default_factory=list)
    budget: int | None = None
    max_loaded: int | None = None  # most tenants loaded at once (the host's max_loaded)
    wake: Callable[[], None] = _no_wake
    orders: list[Order] = field(default_factory=list)  # asked by the router, taken by the pager at its next tick

    def ask(self, order: Order) -> bool:
        """Hand ``order`` to the supervisor's loop; False when ``MAX_ORDERS`` wait already."""
        with self.lock:
            if len(self.orders) >= MAX_ORDERS:
                return False
            self.orders.append(order)
        self.wake()
        return True
