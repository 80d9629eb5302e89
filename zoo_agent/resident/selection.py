"""`model: "<tenant>:auto"`: the declared adapter nearest the request, by embedding (issue #6).

The embedding model is a zoo entry like any other (fetched, verified, pinned); each
adapter is represented by its description and tags. Mean-pooled, normalised hidden
states; cosine similarity; below the tenant's threshold the base model answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zoo_agent.resident.config import AdapterConfig

__all__ = ["Embedder", "Selector", "adapter_text"]


def adapter_text(adapter: AdapterConfig) -> str:
    return " ".join([adapter.description, *adapter.tags]).strip() or adapter.id


class Embedder:
    """A sentence-embedding model from the zoo: texts in, mean-pooled normalised vectors out
    (their dot product is the cosine similarity). The one embedder: `<tenant>:auto` and route
    similarity rules (resident/similarity.py) both use it."""

    def __init__(self, embedding_dir: Path, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(embedding_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(embedding_dir, local_files_only=True, use_safetensors=True).to(device).eval()
        self.device = device

    def embed(self, texts: list[str]) -> Any:
        import torch

        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)


class Selector:
    def __init__(self, embedding_dir: Path, threshold: float, device: str = "cpu") -> None:
        self.embedder = Embedder(embedding_dir, device)
        self.threshold = threshold
        self.ids: list[str] = []
        self.vectors: Any = None

    def index(self, adapters: list[AdapterConfig]) -> None:
        self.ids = [a.id for a in adapters]
        self.vectors = self.embedder.embed([adapter_text(a) for a in adapters]) if adapters else None

    def choose(self, text: str) -> tuple[str | None, float]:
        """The best adapter and its similarity; (None, best) when none reaches the threshold."""
        if self.vectors is None or not text.strip():
            return None, 0.0
        scores = (self.embedder.embed([text]) @ self.vectors.T)[0]
        best = int(scores.argmax())
        score = float(scores[best])
        return (self.ids[best] if score >= self.threshold else None), score
