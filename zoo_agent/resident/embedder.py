"""The one sentence-embedding model wrapper (issues #6, #21, #32, #36): imported by the worker
(adapter selection for ``<tenant>:auto``, and an embedding tenant's ``/v1/embeddings``) and by the
router (routes' similarity rules), so all measure the same way. It pools as the model's directory
declares (``pooling.py``: sentence-transformers' ``modules.json``; mean over tokens, normalised,
where nothing is declared). torch and transformers are imported on first use only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from zoo_agent.resident.pooling import Layout, LayoutError, read_layout

__all__ = ["Embedder"]

log = logging.getLogger("zoo_agent.resident")

#: What a tokenizer that declares no limit says (transformers' VERY_LARGE_INTEGER): no limit.
_NO_LIMIT = 1 << 40


class Embedder:
    """A sentence-embedding model from the zoo. ``embed``: texts in, normalised vectors out, cut
    at ``max_tokens`` (their dot product is the cosine similarity: route rules and ``:auto``);
    ``encode``: tokenized texts in, the model's own vectors out (normalised only where it declares
    ``Normalize``), what ``SentenceTransformer.encode`` gives. Called from one thread at a time.

    ``strict`` (an embedding tenant): a pipeline ``pooling.py`` cannot reproduce is a ``LayoutError``.
    Otherwise (route similarity, ``<tenant>:auto``, which measured with mean pooling before models
    were read for theirs) such a model is mean-pooled as before, with a warning, not refused."""

    def __init__(self, embedding_dir: Path, device: str = "cpu", dtype: str | None = None, *, strict: bool = False) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        try:
            self.layout: Layout = read_layout(embedding_dir)
        except LayoutError as exc:
            if strict:
                raise
            log.warning("%s: %s; pooled as by default (mean, normalised)", embedding_dir, exc)
            self.layout = Layout()
        where = embedding_dir / self.layout.transformer if self.layout.transformer else embedding_dir
        self.tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
        loaded = AutoModel.from_pretrained(where, local_files_only=True, use_safetensors=True,
                                           **({"dtype": getattr(torch, dtype)} if dtype else {}))  # fmt: skip
        self.model = loaded.to(device).eval()
        self.device = device
        own = getattr(self.model.config, "max_position_embeddings", None)
        limits = [n for n in (self.layout.max_seq_length or self.tokenizer.model_max_length, own) if isinstance(n, int) and 0 < n < _NO_LIMIT]
        self.max_tokens: int = min(limits, default=512)  # sentence-transformers' max_seq_length, as it caps it
        self.dimension: int = int(self.model.config.hidden_size) * len(self.layout.modes)

    def text(self, text: str) -> str:
        """What is tokenized of ``text``: after the model's default prompt, lowercased where it says so."""
        text = self.layout.prompt + text
        return text.lower() if self.layout.lower_case else text

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, special tokens included, uncut: what a request is checked and counted by."""
        ids: list[list[int]] = self.tokenizer([self.text(t) for t in texts], truncation=False)["input_ids"]
        return ids

    def encode(self, ids: list[list[int]]) -> Any:
        """One forward pass over ``ids`` (padded as the tokenizer pads), pooled as the model declares: float32 on the CPU."""
        batch = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        return self._forward(batch, self.layout.normalize).float().cpu()

    def embed(self, texts: list[str]) -> Any:
        """Normalised vectors of ``texts``, each cut at ``max_tokens``."""
        batch = self.tokenizer([self.text(t) for t in texts], padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return self._forward(batch, True)

    def _forward(self, batch: Any, normalize: bool) -> Any:
        import torch

        from zoo_agent.resident.pooling import pool

        batch = batch.to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
        return pool(hidden, batch["attention_mask"], self.layout.modes, normalize)
