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
from dataclasses import dataclass, field
from typing import Literal

from zoo_agent.resident.config import WorkerConfig
from zoo_agent.resident.process import WorkerProcess
from zoo_agent.resident.wire import control as p

__all__ = ["Phase", "Slot", "SlotTable", "Worker"]

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

    @property
    def footprint(self) -> int:
        return max(self.estimate, self.measured)

    @property
    def busy(self) -> bool:
        return self.inflight > 0 or self.queued > 0

    @property
    def workers(self) -> list[Worker]:
        return [w for w in (self.serving, self.incoming) if w is not None]


def _no_wake() -> None:
    """A table with no supervisor loop to wake (a unit test's)."""


@dataclass
class SlotTable:
    """The host's tenants, what the supervisor and the router share: ``slots`` change under ``lock``;
    ``order`` (the tenants as the index lists them) and ``budget`` are replaced whole by the
    supervisor when it takes an index; ``wake`` tells the supervisor's loop a request waits."""

    slots: dict[str, Slot] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    order: list[str] = field(default_factory=list)
    budget: int | None = None
    wake: Callable[[], None] = _no_wake
