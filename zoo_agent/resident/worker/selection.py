"""`model: "<tenant>:auto"`: the declared adapters nearest the request, by embedding (issues #6, #21).

The embedding model is a zoo entry like any other (fetched, verified, pinned); each
adapter is represented by its description and tags. Mean-pooled, normalised hidden
states; cosine similarity; below the tenant's threshold the base model answers. Up to
``max_adapters`` adapters that pass the threshold answer together as a ``Composition``.

The decisions (which adapters, in which order, with which weights) are pure functions
here; building a composition with peft is adapters.py's, on the model's thread.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zoo_agent.resident.config import AdapterConfig
from zoo_agent.resident.embedder import Embedder

__all__ = ["WEIGHT_STEP", "Combine", "Composition", "Selector", "adapter_text", "compose", "normalised_weights", "ranked"]

Combine = Literal["sum", "weighted"]

#: "weighted" rounds its weights to this step, so that requests of nearly the same similarities
#: share one cached composition instead of each building its own (a build is a peft module walk).
WEIGHT_STEP = 0.05


def adapter_text(adapter: AdapterConfig) -> str:
    return " ".join([adapter.description, *adapter.tags]).strip() or adapter.id


def ranked(ids: Sequence[str], scores: Sequence[float], *, threshold: float, limit: int,
           exclude: frozenset[str] = frozenset()) -> list[tuple[str, float]]:  # fmt: skip
    """Up to ``limit`` (id, similarity) at or above ``threshold``, most similar first. Equal
    similarities keep the declared order (as argmax did when one adapter was chosen), so the
    same request always gets the same composition. ``exclude``: refused adapters, never chosen."""
    order = sorted(range(len(ids)), key=lambda i: -scores[i])  # stable: ties in declared order
    return [(ids[i], scores[i]) for i in order if scores[i] >= threshold and ids[i] not in exclude][:limit]


def normalised_weights(similarities: Sequence[float], step: float = WEIGHT_STEP) -> tuple[float, ...]:
    """The similarities scaled to sum 1, in multiples of ``step`` that still sum to 1 (largest
    remainders round up; ties: the more similar first). A negative similarity (a threshold
    below 0) counts as 0; when nothing is left the adapters weigh the same."""
    clamped = [max(s, 0.0) for s in similarities]
    total = sum(clamped)
    units = round(1 / step)
    shares = [s / total * units for s in clamped] if total > 0 else [units / len(clamped)] * len(clamped)
    whole = [int(share) for share in shares]
    for i in sorted(range(len(shares)), key=lambda i: -(shares[i] - whole[i]))[: units - sum(whole)]:
        whole[i] += 1
    return tuple(round(w * step, 4) for w in whole)


@dataclass(frozen=True)
class Composition:
    """Adapters answering one request together, and how: the key of its cached composition."""

    ids: tuple[str, ...]  # most similar first: peft adds them in this order
    combine: Combine
    weights: tuple[float, ...] = ()  # "weighted": one per id

    @property
    def name(self) -> str:
        """Its name inside peft: an adapter id may hold '.', which a module name cannot."""
        return "compose-" + hashlib.sha256(repr((self.combine, self.ids, self.weights)).encode()).hexdigest()[:12]

    def label(self, labels: Sequence[str]) -> str:
        """'code@1+terse@2', weighted 'code@1*0.55+terse@2*0.45': what answered (``labels``: id@version per id)."""
        if self.combine == "weighted":
            return "+".join(f"{label}*{w:g}" for label, w in zip(labels, self.weights, strict=True))
        return "+".join(labels)


def compose(picked: Sequence[tuple[str, float]], combine: Combine) -> Composition:
    """The composition of two or more chosen adapters (most similar first)."""
    ids = tuple(aid for aid, _ in picked)
    return Composition(ids, combine, normalised_weights([s for _, s in picked]) if combine == "weighted" else ())


class Selector:
    def __init__(self, embedding_dir: Path, threshold: float, device: str = "cpu", max_adapters: int = 1) -> None:
        self.embedder = Embedder(embedding_dir, device)
        self.threshold, self.device, self.max_adapters = threshold, device, max_adapters
        self.ids: list[str] = []
        self.vectors: Any = None

    def index(self, adapters: list[AdapterConfig]) -> None:
        self.ids = [a.id for a in adapters]
        self.vectors = self.embedder.embed([adapter_text(a) for a in adapters]) if adapters else None

    def choose(self, text: str, exclude: frozenset[str] = frozenset()) -> tuple[list[tuple[str, float]], float]:
        """The adapters that reach the threshold (most similar first, at most max_adapters) and the
        similarity to report: the first one's, or the best of all when none reaches it."""
        if self.vectors is None or not text.strip():
            return [], 0.0
        scores = [float(s) for s in (self.embedder.embed([text]) @ self.vectors.T)[0]]
        picked = ranked(self.ids, scores, threshold=self.threshold, limit=self.max_adapters, exclude=exclude)
        return picked, (picked[0][1] if picked else max(scores))
