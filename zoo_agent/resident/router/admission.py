"""Admission: a place in a tenant's worker, or a place in its queue, or a refusal (issues #20, #32).

A tenant's worker holds ``Slot.capacity`` requests at once (``max_batch + max_queue``, what the
worker itself holds); the router holds as many more, best priority first (aged: ``wire/priority``),
while the tenant is not loaded (paged out, fetching, loading, restarting). ``Admission`` is the
only writer of ``Slot.inflight``, ``queued`` and ``wanted``, always under ``SlotTable.lock``.
It knows nothing of HTTP, workers' sockets or peers: what it gives is a path (the worker's socket)
or an error (``Unavailable`` 503, ``QueueFull`` 429), so ``tests/unit/test_admission.py`` drives it
with slots alone. It never logs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from zoo_agent.resident.slots import SlotTable
from zoo_agent.resident.wire.http import ApiError
from zoo_agent.resident.wire.priority import PriorityQueue

__all__ = ["Admission", "QueueFull", "Unavailable"]


class Unavailable(ApiError):
    """The tenant cannot be served now (it does not fit, failed to load or fetch, is gone): 503."""

    def __init__(self, message: str) -> None:
        super().__init__(503, message, code="model_unavailable")


class QueueFull(ApiError):
    """The tenant's worker and queue are full: 429."""

    def __init__(self, message: str) -> None:
        super().__init__(429, message, code="queue_full")


class _Waiter:
    """A request waiting for a place in its tenant's worker."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[str] = loop.create_future()


class Admission:
    """Per-tenant queues over the shared slot table. ``pump`` runs on the router's loop only
    (the supervisor's thread asks for it with ``loop.call_soon_threadsafe``)."""

    def __init__(self, table: SlotTable, aging_seconds: float, load_wait: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.table, self.aging_seconds, self.load_wait, self.clock = table, aging_seconds, load_wait, clock
        self.queues: dict[str, PriorityQueue[_Waiter]] = {}
        self.stopping = False  # who waits is answered, and nobody new waits: nothing loads any more

    def pump(self, tenant: str) -> None:
        """Give free places in the tenant's worker to its best waiters; answer them all if it is refused."""
        queue = self.queues.get(tenant)
        if not queue:
            return
        with self.table.lock:
            slot = self.table.slots.get(tenant)
            while len(queue):
                if slot is None or slot.refusal is not None or self.stopping:
                    waiter = queue.pop_best()
                    if not waiter.future.done():
                        why = "the resident is stopping" if self.stopping else str(slot.refusal) if slot else f"tenant '{tenant}' is no longer served here"
                        waiter.future.set_exception(Unavailable(why))
                    continue
                if slot.path is None or slot.inflight >= slot.capacity:
                    break
                waiter = queue.pop_best()
                if waiter.future.done():  # its client left
                    continue
                slot.inflight += 1
                slot.last_used = self.clock()
                waiter.future.set_result(slot.path)
            if slot is not None:
                slot.queued = len(queue)
                slot.wanted = slot.wanted or bool(len(queue))

    def free(self, tenant: str) -> str | None:
        """A place in the tenant's worker now (its socket path; give it back with ``release``), when one is free
        and no one waits; else None (``place`` queues, or says why not). No task, no wait: the common case."""
        with self.table.lock:
            slot = self.table.slots.get(tenant)
            queue = self.queues.get(tenant)
            if slot is None or slot.path is None or slot.inflight >= slot.capacity or (queue is not None and len(queue)):
                return None
            slot.inflight += 1
            slot.last_used = self.clock()
            return slot.path

    async def take(self, tenant: str, priority: int, gone: asyncio.Future[None], comment: Callable[[str], Awaitable[None]] | None) -> str | None:
        """A place in the tenant's worker (its socket): at once when one is free, else once ``place`` gives one
        (``wait``: its deadline, its comments); None when the client left first."""
        path = self.free(tenant)
        if path is not None:
            return path
        return await self.wait(asyncio.ensure_future(self.place(tenant, priority)), gone, tenant, comment)

    async def place(self, tenant: str, priority: int) -> str:
        """A place in the tenant's worker: its socket path (give it back with ``release``)."""
        queue = self.queues.setdefault(tenant, PriorityQueue(self.aging_seconds))
        waiter = self._enqueue(tenant, priority, queue)
        if isinstance(waiter, str):
            return waiter
        self.table.wake()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            placed = False
            with self.table.lock:
                future = waiter.future
                if future.done() and not future.cancelled() and future.exception() is None:
                    placed = True  # given a place just as its client left: give it back
                else:
                    future.cancel()
                    queue.remove(waiter)
                    if (slot := self.table.slots.get(tenant)) is not None:
                        slot.queued = len(queue)
            if placed:
                self.release(tenant)
            raise

    def _enqueue(self, tenant: str, priority: int, queue: PriorityQueue[_Waiter]) -> str | _Waiter:
        """A free place now (its path), or a place in the queue; ``Unavailable`` or ``QueueFull`` when neither."""
        with self.table.lock:
            slot = self.table.slots.get(tenant)
            if slot is None:
                raise Unavailable(f"tenant '{tenant}' is not served by this host")
            if slot.path is not None and not len(queue):
                if slot.inflight >= slot.capacity:
                    raise QueueFull(f"tenant '{tenant}' is at capacity ({slot.capacity} requests running and waiting); retry later")
                slot.inflight += 1
                slot.last_used = self.clock()
                return slot.path
            if len(queue) >= slot.capacity:
                raise QueueFull(f"tenant '{tenant}' is {slot.phase.replace('_', ' ')} and {len(queue)} requests already wait for it; retry later")
            if slot.phase == "failed" and slot.refusal is not None:
                slot.refusal = None  # a new request tries a failed tenant again
            if slot.refusal is not None:
                raise Unavailable(slot.refusal)
            if self.stopping:
                raise Unavailable("the resident is stopping")
            waiter = _Waiter(asyncio.get_running_loop())
            queue.push(waiter, priority, self.clock())
            slot.queued, slot.wanted, slot.last_used = len(queue), True, self.clock()
            return waiter

    def release(self, tenant: str) -> None:
        """A request's place in its worker is free again: the next waiter may have it."""
        with self.table.lock:
            slot = self.table.slots.get(tenant)
            if slot is not None:
                slot.inflight = max(0, slot.inflight - 1)
                slot.last_used = self.clock()
        self.pump(tenant)

    async def wait(self, placing: asyncio.Future[str], gone: asyncio.Future[None], tenant: str,
                   comment: Callable[[str], Awaitable[None]] | None, seconds: float | None = None) -> str | None:  # fmt: skip
        """The place ``placing`` gets within ``seconds`` (``load_wait`` by default; ``TimeoutError`` past it),
        or None when the client left (``gone``) first. Every 2 s ``comment`` says what the tenant is doing."""
        deadline = time.monotonic() + (self.load_wait if seconds is None else seconds)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                placing.cancel()
                raise TimeoutError
            both: set[asyncio.Future[Any]] = {placing, gone}
            done, _ = await asyncio.wait(both, timeout=min(left, 2.0), return_when=asyncio.FIRST_COMPLETED)
            if placing in done:
                return placing.result()
            if gone in done:
                placing.cancel()
                return None
            if comment is not None:
                await comment(f"waiting for {tenant}: {self.phase(tenant)}")

    def phase(self, tenant: str) -> str:
        """What a waiting client is told the tenant is doing: ``loading``, ``fetching 40%``, ``gone``."""
        slot = self.table.slots.get(tenant)
        what = slot.phase.replace("_", " ") if slot else "gone"
        if slot is not None and slot.phase == "fetching":
            what += f" {slot.fetch_pct}%"
        return what

    def overflows(self, tenant: str) -> str | None:
        """Why a request that may go to peers goes there before it waits here: its tenant is at
        capacity, or does not fit now (the pager holds it back); None when it may wait here."""
        with self.table.lock:
            slot = self.table.slots.get(tenant)
            if slot is None:
                return None
            if slot.path is not None and slot.inflight >= slot.capacity:
                return f"at capacity ({slot.capacity} running and waiting)"
            if slot.path is None and slot.blocked:
                return f"does not fit now ({slot.blocked})"
        return None

    def counts_by_class(self, tenant: str) -> dict[str, int]:
        """Who waits for the tenant, by priority class (the metric's labels)."""
        queue = self.queues.get(tenant)
        return queue.counts_by_class() if queue is not None else {}

    def waiting(self) -> list[str]:
        """The tenants with a queue (each is answered at stop)."""
        return list(self.queues)
