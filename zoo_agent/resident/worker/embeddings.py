"""An embedding tenant's engine (issue #36): one thread owns the model, as the generation engine's does,
and batches the texts of every waiting request into forward passes.

A request is a ``Job`` of texts, queued by priority (``wire/priority``'s aged queue: best class first,
FIFO within one, a waiting job gains a class per ``aging_seconds``). Each step, the thread takes up
to ``max_rows`` texts from the jobs in that order (a large job spreads over several passes, and a
better one that arrives meanwhile goes first at the next pass), embeds them in one forward pass and
hands each job its vectors when its last text is done. A job is tokenized once, on this thread, when
it is first reached: a text longer than ``max_tokens`` fails its job with a 400 naming it (cut, its
vector would not be the whole text's, and ``SentenceTransformer.encode`` cuts silently). Texts of a
job are embedded longest first, so a pass pads little. A pass holds at most ``max_rows`` x
``max_tokens`` tokens: the memory one forward pass may take.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from zoo_agent.resident.wire.http import ApiError
from zoo_agent.resident.wire.priority import CLASSES, PriorityQueue
from zoo_agent.resident.worker.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, TOKEN_BUCKETS

if TYPE_CHECKING:
    from zoo_agent.resident.embedder import Embedder

__all__ = ["Embedded", "EmbeddingEngine", "EmbeddingMetrics", "Job"]


@dataclass
class Embedded:
    """A finished job: one float32 little-endian vector per text, in the request's order."""

    rows: list[bytes]
    prompt_tokens: int
    queue_seconds: float


@dataclass(eq=False)
class Job:
    texts: tuple[str, ...]
    priority: int
    arrival: float
    future: Future[Embedded] = field(default_factory=Future)
    ids: list[list[int]] | None = None  # tokenized on the engine's thread
    order: list[int] = field(default_factory=list)  # texts by length, longest first
    taken: int = 0  # texts of ``order`` given to a pass
    rows: list[bytes] = field(default_factory=list)
    done: int = 0
    started: float | None = None  # its first pass began


class EmbeddingMetrics:
    """The worker's Prometheus metrics, named as the generating worker's (vLLM's, prefixed ``zoo:``) where they mean the same."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.e2e = Histogram("zoo:e2e_request_latency_seconds", "Request latency, end to end.", registry=r, buckets=LATENCY_BUCKETS)
        self.queue = Histogram("zoo:request_queue_time_seconds", "Time waiting for the model.", registry=r, buckets=LATENCY_BUCKETS)
        self.prompt_tokens = Counter("zoo:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.requests = Counter("zoo:request_success", "Finished requests.", ["finished_reason"], registry=r)
        self.cancelled = Counter("zoo:request_cancelled", "Requests whose client went away; generation stopped early.", registry=r)
        self.running = Gauge("zoo:num_requests_running", "Requests being embedded now.", registry=r)
        self.waiting = Gauge("zoo:num_requests_waiting", "Requests waiting for the model.", registry=r)
        self.waiting_by_priority = Gauge("zoo:num_requests_waiting_by_priority", "Requests waiting for the model, by priority class (X-Zoo-Priority).",
                                         ["priority"], registry=r)  # fmt: skip
        self.iteration_tokens = Histogram("zoo:iteration_tokens_total", "Tokens fed to the model per engine step.", registry=r, buckets=TOKEN_BUCKETS)
        self.batch = Histogram("zoo:embedding_batch_inputs", "Texts embedded together per forward pass.", registry=r, buckets=BATCH_BUCKETS)
        self.swap_seconds = Gauge("zoo:model_swap_seconds", "Load time of the serving version.", registry=r)
        self.reloads = Counter("zoo:reloads", "Reloads of this tenant, by result.", ["result"], registry=r)
        self.requests.labels("stop")


class EmbeddingEngine:
    """The one thread that owns ``embedder``; ``submit`` from any thread, ``close`` to stop it."""

    def __init__(self, embedder: Embedder, *, max_rows: int, max_tokens: int, aging_seconds: float = 10.0,
                 metrics: EmbeddingMetrics | None = None, clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.embedder, self.max_rows, self.max_tokens = embedder, max_rows, max_tokens
        self.metrics = metrics or EmbeddingMetrics()
        self.clock = clock
        self.queue: PriorityQueue[Job] = PriorityQueue(aging_seconds)
        self.lock = threading.Condition()
        self.closing = False
        self.progressed = clock()  # the last pass ended, or work arrived at an idle engine
        self.thread = threading.Thread(target=self._run, name="embedding", daemon=True)
        self.thread.start()

    # -- any thread ------------------------------------------------------------------------------
    def submit(self, texts: tuple[str, ...], priority: int = CLASSES["default"]) -> Job:
        job = Job(texts, priority, self.clock())
        with self.lock:
            if not len(self.queue):
                self.progressed = job.arrival  # idle until now: not a stall
            self.queue.push(job, priority, job.arrival)
            self.lock.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: its texts not yet embedded never will be."""
        with self.lock:
            if self.queue.remove(job):
                self.metrics.cancelled.inc()
        job.future.cancel()

    @property
    def waiting(self) -> int:
        with self.lock:
            return sum(1 for job in self.queue if job.started is None)

    @property
    def running(self) -> int:
        with self.lock:
            return sum(1 for job in self.queue if job.started is not None)

    def jobs(self) -> int:
        with self.lock:
            return len(self.queue)

    def waiting_by_class(self) -> dict[str, int]:
        with self.lock:
            return self.queue.counts_by_class()

    def stalled(self, seconds: float) -> bool:
        """Work waits and no pass ended for ``seconds``: the model hangs (the worker stops answering pings)."""
        with self.lock:
            return bool(len(self.queue)) and self.clock() - self.progressed > seconds

    def close(self) -> None:
        with self.lock:
            self.closing = True
            self.lock.notify()

    # -- the engine's thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.lock:
                while not len(self.queue) and not self.closing:
                    self.lock.wait()
                if self.closing:
                    return
                jobs = list(self.queue)  # in the order they are served
            try:
                self._step(jobs)
            except Exception as exc:  # noqa: BLE001 - a pass that fails fails its jobs, never the thread
                for job in jobs:
                    if job.started is not None and not job.future.done():
                        self._finish(job, exc)

    def _step(self, jobs: list[Job]) -> None:
        """One forward pass over the next ``max_rows`` texts of ``jobs``."""
        rows: list[tuple[Job, int]] = []
        for job in jobs:
            if len(rows) >= self.max_rows:
                break
            if job.ids is None and not self._tokenize(job):
                continue
            take = job.order[job.taken : job.taken + self.max_rows - len(rows)]
            job.taken += len(take)
            rows += [(job, i) for i in take]
            if job.started is None:
                job.started = self.clock()
        if not rows:
            return
        ids = [job.ids[i] for job, i in rows if job.ids is not None]
        vectors = self.embedder.encode(ids).numpy().astype("<f4", copy=False)
        self.metrics.batch.observe(len(rows))
        self.metrics.iteration_tokens.observe(sum(len(x) for x in ids))
        for (job, i), vector in zip(rows, vectors, strict=True):
            job.rows[i] = vector.tobytes()
            job.done += 1
            if job.done == len(job.texts):
                self._finish(job, None)
        with self.lock:
            self.progressed = self.clock()

    def _tokenize(self, job: Job) -> bool:
        """The job's token ids, each text within ``max_tokens``; False when it failed (and was finished)."""
        try:
            ids = self.embedder.tokenize(list(job.texts))
        except Exception as exc:  # noqa: BLE001 - a text the tokenizer fails on fails its request alone
            self._finish(job, exc)
            return False
        long = next((i for i, x in enumerate(ids) if len(x) > self.max_tokens), None)
        if long is not None:
            where = "input" if len(job.texts) == 1 else f"input[{long}]"
            self._finish(job, ApiError(400, f"{where}: {len(ids[long])} tokens; this model embeds at most {self.max_tokens} per text", "input",
                                       "context_length_exceeded"))  # fmt: skip
            return False
        job.ids, job.rows = ids, [b""] * len(ids)
        job.order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        return True

    def _finish(self, job: Job, failed: BaseException | None) -> None:
        with self.lock:
            self.queue.remove(job)
        started = job.started if job.started is not None else self.clock()
        tokens = sum(len(x) for x in job.ids or ())
        try:
            if failed is not None:
                job.future.set_exception(failed)
                return
            job.future.set_result(Embedded(job.rows, tokens, started - job.arrival))
        except InvalidStateError:
            return  # cancelled meanwhile: its client is gone
        self.metrics.prompt_tokens.inc(tokens)
        self.metrics.queue.observe(started - job.arrival)


def warm_up(engine: EmbeddingEngine, timeout: float = 300.0) -> Any:
    """A real forward pass before READY (as a generating worker's real generation)."""
    return engine.submit(("warm-up",)).future.result(timeout)
