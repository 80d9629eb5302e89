"""Which engine a worker runs, and the warm-up generation through it (issues #5, #19)."""

from __future__ import annotations

import threading
from typing import Any

from zoo_agent.resident.engine.base import Generated, Request, Scheduler, log
from zoo_agent.resident.engine.batcher import Batcher
from zoo_agent.resident.engine.serial import Serial

__all__ = ["batchable", "scheduler_for", "warm_up"]


def batchable(model: Any) -> str | None:
    """Why this model's cache cannot be batched here, or None when it can: left-padded rows
    need plain dynamic layers (a sliding-window or hybrid cache keeps per-layer offsets)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=model.config).layers
    odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
    return f"its cache has {', '.join(sorted(odd))} layers" if odd else None


def scheduler_for(backend: Any, max_batch: int) -> Scheduler:
    """The batching engine where it can run; else generate() one at a time, or, for the Ollama
    daemon (which batches itself), up to ``max_batch`` requests passed through at once."""
    from zoo_agent.resident.worker.backend import TransformersBackend

    if not isinstance(backend, TransformersBackend):
        return Serial(backend, threads=max_batch)
    if max_batch > 1:
        if (why := batchable(backend.model)) is None:
            return Batcher(backend, max_batch=max_batch)
        log.warning("%s: %s; serving one request at a time (resources.max_batch 1)", backend.version_dir.name, why)
    return Serial(backend)


def warm_up(scheduler: Scheduler, timeout: float = 600.0) -> str:
    """A real one-token generation on the path requests take: READY means the model answers
    through it, not that files exist (issue #5)."""
    done, out = threading.Event(), list[Any]()

    def emit(item: Any) -> None:
        if isinstance(item, (BaseException, Generated)):
            out.append(item)
            done.set()

    scheduler.submit(Request(None, "Hello", 1, 0.0, 1.0), Generated(), threading.Event(), emit, stream=False)
    if not done.wait(timeout):
        raise TimeoutError(f"the warm-up generation did not finish in {timeout:.0f}s")
    if isinstance(out[0], BaseException):
        raise out[0]
    return str(out[0].text)
