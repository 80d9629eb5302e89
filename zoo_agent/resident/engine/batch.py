"""The rows a batch decodes together and their one KV cache (issue #32: the batching engine's bookkeeping).

Rows are left-padded to a common cache length; ``mask`` says which positions are real tokens (1) and
which are padding (0). Prefilled rows join with both sides padded to one length; finished rows leave,
a session's row taking its own cache with it, and the padding no remaining row needs is cut off.
"""

from __future__ import annotations

from typing import Any

from zoo_agent.resident.engine.cache import join, row, select
from zoo_agent.resident.engine.sequence import Seq

__all__ = ["Batch"]


class Batch:
    """The decoding rows, their ``DynamicCache`` and attention mask (``[rows, cache length]``)."""

    def __init__(self) -> None:
        self.rows: list[Seq] = []
        self.mask: Any = None
        self.cache: Any = None

    def join(self, seqs: list[Seq], cache: Any, mask: Any) -> None:
        """Prefilled rows join the batch's: both left-padded to one length."""
        if not self.rows:
            self.rows, self.cache, self.mask = list(seqs), cache, mask
            return
        self.cache, self.mask = join(self.cache, self.mask, cache, mask)
        self.rows.extend(seqs)

    def leave(self, done: list[int], config: Any) -> list[Seq]:
        """The rows at ``done`` leave (a session's keeps its row of the cache); the padding no remaining row needs is cut off."""
        finished = [self.rows[i] for i in done]
        for i, seq in zip(done, finished, strict=True):
            if seq.request.session is not None and not seq.failed:
                seq.cache = row(self.cache, self.mask, i, config)
        keep = [i for i in range(len(self.rows)) if i not in set(done)]
        self.rows = [self.rows[i] for i in keep]
        if keep:
            self.cache, self.mask = select(self.cache, self.mask, keep)
        else:
            self.cache = self.mask = None
        return finished

    def drop(self) -> list[Seq]:
        """Every row, out (a step that failed them all); the batch is empty after."""
        rows, self.rows, self.mask, self.cache = self.rows, [], None, None
        return rows
