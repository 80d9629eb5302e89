"""Continuous batching for the transformers backend (issue #19): sequences join and leave
a running batch between decode steps.

Why our own engine, not transformers' ``ContinuousBatchingManager``: that manager runs every
request under one generation config and one set of weights, so it has no per-request
sampling, no per-request LoRA adapter, no way to start a sequence from a session's saved
KV cache, and no priority. This is the smallest engine that has them, built from
transformers' own parts: ``DynamicCache``, the logits processors ``generate()`` would build
for the same request (so a model's ``generation_config.json`` means what it means there),
and ``TextStreamer``'s incremental decoding.

A step: one prefill, then one decode step of every running row together (``steps.py``, over
the rows and their cache in ``batch.py``). Here: the queue, admission between steps, and the
engine's one thread.

Everything that touches the model runs on the engine's one thread, so peft's global
``set_adapter`` cannot leak between requests. Adapter management (``call``) runs between
steps when no sequence is in flight: admission pauses until then.

Adapter compositions (issue #21): a "weighted" one is a peft adapter of its own, so its rows
mix with any others through ``adapter_names``. A "sum" one activates several adapters at once,
which ``adapter_names`` (one adapter per row) cannot say, and activating them for the whole
batch would run them on the other rows too: its sequences are decoded in a batch of their own
(``compatible``). One waiting for such a batch stops admission until the running rows finish,
so neither side starves; building a per-row sum into peft's mixed forward was not worth a fork.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from zoo_agent.resident.engine.base import Emit, Generated, Model, Request, Stats, log
from zoo_agent.resident.engine.sequence import Seq
from zoo_agent.resident.engine.steps import Steps
from zoo_agent.resident.wire.priority import PriorityQueue

__all__ = ["PREFILL_CHUNK", "Batcher"]

#: Prompt tokens fed per engine step: ~1.5 s on 2 CPU cores for the Qwen2-0.5B shape, so
#: running rows wait at most that long for a joining sequence's prefill.
PREFILL_CHUNK = 512


class Batcher:
    """The batching engine: ``submit`` from any thread; the model runs on the engine thread."""

    def __init__(self, backend: Model, *, max_batch: int, prefill_chunk: int = PREFILL_CHUNK, aging_seconds: float = 10.0) -> None:
        self.backend, self.max_batch = backend, max_batch
        self.queue: PriorityQueue[Seq] = PriorityQueue(aging_seconds)  # best first, then oldest (issue #20)
        self.clock: Callable[[], float] = time.monotonic  # arrival times: a test's own clock makes aging deterministic
        self.calls: deque[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.last_step = time.monotonic()
        self.stats = Stats()
        self.on_step: Callable[[int, int], None] | None = None  # (rows decoded, tokens fed): the metrics
        self.steps = Steps(backend, prefill_chunk, self.stats)  # the sequences in flight, touched on the engine thread only
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()

    # -- any thread -------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self.queue)

    @property
    def running(self) -> int:
        return self.steps.running

    @property
    def aging_seconds(self) -> float:
        return self.queue.aging_seconds

    @aging_seconds.setter
    def aging_seconds(self, value: float) -> None:
        with self.cond:
            self.queue.aging_seconds = value

    def waiting_by_class(self) -> dict[str, int]:
        with self.cond:
            return self.queue.counts_by_class()

    def submit(self, request: Request, result: Generated, cancel: threading.Event, emit: Emit, stream: bool = True) -> None:
        with self.cond:
            queued = self.clock()
            self.queue.push(Seq(request, result, cancel, emit, stream, queued), request.priority, queued)
            self.cond.notify()

    def call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn`` on the engine thread once no sequence is in flight (new ones wait for it)."""
        future: Future[Any] = Future()
        with self.cond:
            self.calls.append((fn, args, future))
            self.cond.notify()
        return future

    def stalled(self, seconds: float) -> bool:
        """Work is in flight and no step finished for ``seconds``: the model hangs."""
        return bool(self.steps.running) and time.monotonic() - self.last_step > seconds

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()

    # -- the engine thread ------------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        steps = self.steps
        while True:
            with self.cond:
                while not (self.queue or steps.running or self.calls or self.closed):
                    self.cond.wait()
                    self.last_step = time.monotonic()  # idle time is no stall
                if self.closed:
                    return
            fed = rows = 0
            try:
                with torch.inference_mode():
                    self._run_calls()
                    self._admit()
                    fed = steps.prefill() if steps.joining else 0
                    rows = len(steps.batch.rows)
                    if rows:
                        steps.decode()
            except Exception as exc:  # noqa: BLE001 - a bug here must fail requests, never end the engine thread
                log.error("engine step failed: %s", exc, exc_info=exc)
                steps.fail_all(exc)
            self.stats.steps += 1
            self.last_step = time.monotonic()
            if self.on_step is not None and fed + rows:
                self.on_step(rows, fed + rows)

    def _run_calls(self) -> None:
        while self.calls and not self.steps.running:
            fn, args, future = self.calls.popleft()
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - the caller's to handle
                future.set_exception(exc)

    def _admit(self) -> None:
        """Waiting sequences join, best first (priority, aged; then oldest), while there is room and no call waits:
        priority decides admission into the running batch, never preempts a running row."""
        steps = self.steps
        busy = {s.aid for s in steps.in_flight() if s.aid is not None}
        deferred: list[Seq] = []
        while self.queue and not self.calls and steps.running < self.max_batch:
            with self.cond:
                seq = self.queue.pop_best()
            if seq.cancel.is_set():
                self.stats.cancelled += 1
                continue
            try:
                started = steps.start(seq, frozenset(busy), self.clock)
            except Exception as exc:  # noqa: BLE001 - this request's failure (an adapter, a session), not the batch's
                seq.emit(exc)
                continue
            if started != "joins":
                deferred.append(seq)  # "busy": its adapter needs a slot that a running sequence holds
                if started == "alone":  # it needs a batch of its own: none joins before it
                    break
                continue
            if seq.aid is not None:
                busy.add(seq.aid)
            steps.joining.append(seq)
        if deferred:
            with self.cond:  # back with their own arrival: they keep their place
                for seq in deferred:
                    self.queue.push(seq, seq.request.priority, seq.queued)
