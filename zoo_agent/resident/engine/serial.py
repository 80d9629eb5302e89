"""One generation at a time with ``generate()`` (issue #19), best waiting request first (issue #20)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from zoo_agent.resident.engine.base import Emit, Generated, Generator, Request, Stats
from zoo_agent.resident.priority import PriorityQueue

__all__ = ["Serial"]


class Serial:
    """One generation at a time with ``generate()`` (``resources.max_batch: 1``): the previous
    behaviour, kept as the reference the batching engine is measured and tested against, and
    the path for models whose cache cannot be batched. With ``threads > 1`` (the Ollama
    backend, whose daemon batches itself) requests pass through concurrently.

    Waiting requests are served best first (issue #20): each pool job takes the best waiting
    request from the shared queue, not the one it was submitted with, so the pool's own FIFO
    only decides when a thread is free."""

    def __init__(self, backend: Generator, threads: int = 1, aging_seconds: float = 10.0) -> None:
        self.backend, self.threads = backend, threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="generate")
        self.lock = threading.Lock()
        self.queue: PriorityQueue[_Job] = PriorityQueue(aging_seconds)
        self.running = 0
        self.stats = Stats()
        self.on_step: Callable[[int, int], None] | None = None
        self.clock: Callable[[], float] = time.monotonic  # arrival times: a test's own clock makes aging deterministic

    @property
    def waiting(self) -> int:
        return len(self.queue)

    @property
    def aging_seconds(self) -> float:
        return self.queue.aging_seconds

    @aging_seconds.setter
    def aging_seconds(self, value: float) -> None:
        with self.lock:
            self.queue.aging_seconds = value

    def waiting_by_class(self) -> dict[str, int]:
        with self.lock:
            return self.queue.counts_by_class()

    def submit(self, request: Request, result: Generated, cancel: threading.Event, emit: Emit, stream: bool = True) -> None:
        queued = self.clock()
        with self.lock:
            self.queue.push(_Job(request, result, cancel, emit, stream, queued), request.priority, queued)
        self.pool.submit(self._run_best)

    def _run_best(self) -> None:
        """One pool job: the best waiting request (one job is submitted per request, so each is served once)."""
        with self.lock:
            job = self.queue.pop_best()
            self.running += 1
        request, result, cancel, emit = job.request, job.result, job.cancel, job.emit
        result.queue_seconds = self.clock() - job.queued
        try:
            if cancel.is_set():  # its client left while it waited: nothing to generate
                self.stats.cancelled += 1
                return
            if job.stream:
                for piece in self.backend.stream(request, result, cancel):
                    emit(piece)
            else:
                emit(self.backend.complete(request, result, cancel))
            if cancel.is_set() and result.completion_tokens < request.max_tokens:
                self.stats.cancelled += 1
            emit(result)
        except BaseException as exc:  # noqa: BLE001 - handed to the request's coroutine
            emit(exc)
        finally:
            with self.lock:
                self.running -= 1

    def call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Between two generations (on the one thread; with several, beside them)."""
        return self.pool.submit(fn, *args)

    def stalled(self, seconds: float) -> bool:
        return False  # generate() reports no steps; the worker's event loop is the liveness signal

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass(eq=False)
class _Job:
    """A request waiting in Serial's queue."""

    request: Request
    result: Generated
    cancel: threading.Event
    emit: Emit
    stream: bool
    queued: float
