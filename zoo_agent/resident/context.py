"""A tenant's one context number (issue #33): prompt plus completion tokens one request may hold.

Declared as ``resources.max_context``; else the model's own as ``fit.context`` caps it (at most
``DEFAULT_MAX_CONTEXT``), or that default for a model without a config (an Ollama daemon's). A
model run by our own workers is further bounded by what its files say it can hold: its positions,
and for a sentence-transformers model its ``max_seq_length`` (what sentence-transformers cuts at).
llama-server holds a slot to what ``--ctx-size`` gives it, past the model's training context too.
The launcher puts this number in a worker's config, the card in ``/v1/models`` shows it before the
tenant loads (the worker's own word once it serves), and the worker enforces it.
"""

from __future__ import annotations

from pathlib import Path

from zoo_agent.index.fit import context, positions, read_config
from zoo_agent.index.model import DEFAULT_MAX_CONTEXT
from zoo_agent.resident.pooling import LayoutError, read_layout

__all__ = ["model_context", "served_context"]


def model_context(version_dir: Path) -> tuple[int, int | None]:
    """A fetched version's default context and its own bound: ``fit.context`` of its config (the
    index's default where it has none), and the least of its positions and sentence-transformers'
    ``max_seq_length`` (None where its files name neither)."""
    config = read_config(version_dir)
    if config is None:
        return DEFAULT_MAX_CONTEXT, None
    try:
        seq_length = read_layout(version_dir).max_seq_length
    except LayoutError:
        seq_length = None  # an embedding tenant refuses that model at load; for a generating one it is no bound
    bounds = [n for n in (positions(config), seq_length) if isinstance(n, int) and n > 0]
    return context(config), min(bounds, default=None)


def served_context(declared: int | None, default: int, own: int | None, backend: str) -> int:
    """What the tenant's worker holds a request to: the declared context, else ``default``; bounded by
    ``own`` except under llama.cpp (llama-server serves the declared context as its slots' size)."""
    n = declared if declared is not None else default
    return min(n, own) if own is not None and backend != "llama.cpp" else n
