"""What a worker's app serves from (issue #5): its tenant, backend, limits, scheduler and metrics."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from zoo_agent.index.model import DEFAULT_MAX_CONTEXT
from zoo_agent.resident.engine.base import Scheduler
from zoo_agent.resident.sessions.store import Sessions
from zoo_agent.resident.sessions.summaries import Summarizer
from zoo_agent.resident.worker.backend import TransformersBackend
from zoo_agent.resident.worker.metrics import Metrics
from zoo_agent.resident.worker.scheduling import scheduler_for

__all__ = ["ServingState"]


@dataclass
class ServingState:
    tenant: str
    model: str
    version: str
    backend: TransformersBackend  # or OllamaBackend: the same surface
    defaults: dict[str, Any]
    max_queue: int = 16
    max_batch: int = 16  # sequences decoded together (1: one generate() at a time)
    # Prompt plus completion tokens of one request: the tenant's resources.max_context (issue #33; worker/prepare.py).
    # The worker sets it from its config; the default is the index's, for a tenant that declares none.
    max_context: int = DEFAULT_MAX_CONTEXT
    priority: int = 0  # the tenant's default class for requests that name none (resident/priority.py)
    aging_seconds: float = 10.0  # a waiting request gains one class per this many seconds
    api_key: str | None = field(default=None, repr=False)
    route_sessions: dict[str, Sessions] = field(default_factory=dict)  # route id -> its sessions (issue #21)
    summarizers: dict[str, Summarizer] = field(default_factory=dict)  # route id -> its summarizer
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False
    preparing: int = 0  # event loop only
    served: int = 0
    tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Where generations run: the batching engine, or one generate() at a time (worker/scheduling.py).
    scheduler: Scheduler = None  # type: ignore[assignment]  # built in __post_init__ when not given
    # Sessions read and prompts tokenized, one at a time, beside the generation thread (never on the event loop).
    preparer: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="prepare"))
    _counted: dict[str, int] = field(default_factory=dict)  # backend totals already added to the metrics
    exit_code: int = 0  # the worker's, when something ends it (the ollama daemon went away)

    def __post_init__(self) -> None:
        if self.scheduler is None:
            self.scheduler = scheduler_for(self.backend, self.max_batch)
        self.scheduler.aging_seconds = self.aging_seconds  # the worker builds its scheduler before the state: set here, once
        m = self.metrics

        def observe(rows: int, tokens: int) -> None:  # on the engine's thread; prometheus_client is thread-safe
            if rows:
                m.batch.observe(rows)
            m.iteration_tokens.observe(tokens)

        self.scheduler.on_step = observe

    @property
    def waiting(self) -> int:
        return int(self.scheduler.waiting)

    @property
    def running(self) -> int:
        return int(self.scheduler.running)

    def sync_metrics(self) -> None:
        """Adapter, session and engine counters live beside the model (engine thread); totals are added here."""
        m = self.metrics
        m.running.set(self.running)
        m.waiting.set(self.waiting)
        for name, count in self.scheduler.waiting_by_class().items():
            m.waiting_by_priority.labels(name).set(count)
        self._add(m.cancelled, self.scheduler.stats.cancelled, "cancelled")
        if (sessions := self.backend.sessions) is not None:
            ss = sessions.stats
            for seconds in ss.restore_seconds:
                m.session_restore_seconds.observe(seconds)
            ss.restore_seconds.clear()
            self._add(m.session_restores, ss.restores, "restores")
            self._add(m.session_reprefills, ss.reprefills, "reprefills")
            self._add(m.session_corrupt, ss.corrupt, "corrupt")
        if (adapters := self.backend.adapters) is not None:
            st = adapters.stats
            m.lora_loaded.set(len(adapters.loaded))
            for seconds in st.seconds:
                m.lora_seconds.observe(seconds)
            st.seconds.clear()
            self._add(m.lora_loads.labels("ok"), st.loads, "loads")
            self._add(m.lora_loads.labels("failed"), st.load_failures, "load_failures")
            self._add(m.lora_swaps, st.swaps, "swaps")
            m.lora_compositions_cached.set(len(adapters.compositions))
            self._add(m.lora_compositions_built, st.compositions_built, "compositions_built")

    def _add(self, counter: Any, total: int, key: str) -> None:
        counter.inc(max(0, total - self._counted.get(key, 0)))
        self._counted[key] = total
