"""Which engine a worker's backend runs on (issue #19): the batching engine where the model's
cache can be batched, else one generation at a time (the Ollama daemon batches itself)."""

from __future__ import annotations

from typing import Any

from zoo_agent.resident.engine.base import Scheduler, log
from zoo_agent.resident.engine.batcher import Batcher
from zoo_agent.resident.engine.serial import Serial
from zoo_agent.resident.worker.backend import TransformersBackend

__all__ = ["batchable", "scheduler_for"]


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
    if not isinstance(backend, TransformersBackend):
        return Serial(backend, threads=max_batch)
    if max_batch > 1:
        if (why := batchable(backend.model)) is None:
            return Batcher(backend, max_batch=max_batch)
        log.warning("%s: %s; serving one request at a time (resources.max_batch 1)", backend.version_dir.name, why)
    return Serial(backend)
