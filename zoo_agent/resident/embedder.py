"""The one sentence-embedding model wrapper (issues #6, #21, #32): imported by the worker
(adapter selection for ``<tenant>:auto``) and by the router (routes' similarity rules), so
both measure similarity the same way. torch and transformers are imported on first use only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["Embedder"]


class Embedder:
    """A sentence-embedding model from the zoo: texts in, mean-pooled normalised vectors out
    (their dot product is the cosine similarity). The one embedder: `<tenant>:auto` and route
    similarity rules (the router's similarity module) both use it, the one from the worker's
    process, the other from the router's."""

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
