"""The batching engine's work on the model (issue #32): a sequence started, prompts prefilled, the
running rows decoded one token, and each token chosen and checked as ``generate()`` would.

Only the engine's thread calls these (``Batcher`` owns the thread, the queue and admission): they touch
the model, and peft's adapters are global to it. A prefill takes the joining sequences' prompts together
in one left-padded forward, up to ``prefill_chunk`` tokens in all; a longer prompt, or a session turn
continuing from its restored cache, is fed alone, one chunk per step, so it never stalls the running rows
for long. Each row gets its own position ids and the mask hides the padding, so a row computes what it
would alone (up to floating-point summation order; the tests hold it to exact greedy tokens).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from zoo_agent.resident.engine.base import AdaptersBusy, Model, Stats, log
from zoo_agent.resident.engine.batch import Batch
from zoo_agent.resident.engine.cache import row, select
from zoo_agent.resident.engine.sequence import Seq, begin, choose, compatible, eos_ids, forward_with
from zoo_agent.resident.engine.stops import hit

__all__ = ["Steps"]


class Steps:
    """The sequences in flight: ``joining`` (admitted, prefilling) and ``batch`` (decoding together)."""

    def __init__(self, backend: Model, prefill_chunk: int, stats: Stats) -> None:
        self.backend, self.prefill_chunk, self.stats = backend, prefill_chunk, stats
        self.eos = eos_ids(backend)
        self.joining: deque[Seq] = deque()
        self.batch = Batch()

    @property
    def running(self) -> int:
        return len(self.batch.rows) + len(self.joining)

    def in_flight(self) -> list[Seq]:
        return [*self.batch.rows, *self.joining]

    def start(self, seq: Seq, busy: frozenset[str], clock: Callable[[], float]) -> Literal["joins", "busy", "alone"]:
        """Make ``seq`` ready to join: its prompt's ids, its adapter (``busy``: a slot a running sequence holds),
        a session's restored cache. "alone": it needs a batch of its own (a "sum" composition)."""
        b, request, result = self.backend, seq.request, seq.result
        inputs = b.inputs(request)
        seq.ids = inputs["input_ids"][0].tolist()
        seq.prompt_len = result.prompt_tokens = len(seq.ids)
        try:
            seq.aid = b.resolve(request, result, busy=busy)
        except AdaptersBusy:
            return "busy"
        if not compatible(b.adapters, {s.aid for s in self.in_flight()}, seq.aid):
            return "alone"
        result.queue_seconds = clock() - seq.queued
        begin(seq, b, inputs)
        return "joins"

    def fail_all(self, exc: BaseException) -> None:
        """A step failed where no single sequence is to blame: every sequence in flight gets the error."""
        for seq in (*self.batch.drop(), *self.joining):
            seq.emit(exc)
        self.joining.clear()

    # -- prefill ----------------------------------------------------------------------------
    def prefill(self) -> int:
        """Prompts into the cache: fresh short prompts together in one left-padded forward (up to
        ``prefill_chunk`` tokens in all), else one chunk of the oldest (a long prompt, or a session
        turn continuing from its restored cache). The tokens fed."""
        seq = self.joining[0]
        if seq.cancel.is_set():
            self.joining.popleft()
            self.finish(seq)
            return 0
        if seq.cache is not None or seq.prompt_len > self.prefill_chunk:
            return self._prefill_chunk(seq)
        group, tokens = [], 0
        for s in self.joining:
            if s.cache is not None or s.cancel.is_set() or tokens + s.prompt_len > self.prefill_chunk:
                break
            group.append(s)
            tokens += s.prompt_len
        return self._prefill_group(group)

    def _prefill_chunk(self, seq: Seq) -> int:
        import torch
        from transformers import DynamicCache

        b = self.backend
        chunk = seq.ids[seq.fed : seq.fed + self.prefill_chunk]
        if seq.cache is None:
            seq.cache = DynamicCache(config=b.model.config)
        try:
            with forward_with(self.backend, [seq.aid]) as (model, extra):
                out = model(input_ids=torch.tensor([chunk], device=b.device), attention_mask=torch.ones(1, seq.fed + len(chunk), dtype=torch.long, device=b.device),
                            position_ids=torch.arange(seq.fed, seq.fed + len(chunk), device=b.device)[None], cache=seq.cache,
                            use_cache=True, logits_to_keep=1, **extra)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - this sequence fails alone
            self.joining.popleft()
            seq.emit(exc)
            return len(chunk)
        seq.fed += len(chunk)
        if seq.fed < seq.prompt_len:
            return len(chunk)
        cache, seq.cache = seq.cache, None
        self._first_tokens([seq], out.logits[:, -1, :], cache, torch.ones(1, seq.fed, dtype=torch.long, device=b.device))
        self.joining.popleft()
        return len(chunk)

    def _prefill_group(self, group: list[Seq]) -> int:
        import torch
        from transformers import DynamicCache

        b = self.backend
        length = max(s.prompt_len for s in group)
        ids = torch.tensor([[0] * (length - s.prompt_len) + s.ids for s in group], device=b.device)
        mask = torch.tensor([[0] * (length - s.prompt_len) + [1] * s.prompt_len for s in group], device=b.device)
        cache = DynamicCache(config=b.model.config)
        try:
            with forward_with(self.backend, [s.aid for s in group]) as (model, extra):
                out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=cache,
                            use_cache=True, logits_to_keep=1, **extra)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - these sequences fail, the running batch goes on
            for seq in group:
                self.joining.popleft()
                seq.emit(exc)
            return int(mask.sum())
        for seq in group:
            seq.fed = seq.prompt_len
        self._first_tokens(group, out.logits[:, -1, :], cache, mask)
        for _ in group:  # only now: until they are rows, they count as running (drain and 429 see them)
            self.joining.popleft()
        return int(mask.sum())

    def _first_tokens(self, seqs: list[Seq], logits: Any, cache: Any, mask: Any) -> None:
        """Prefilled sequences choose their first token; the finished ones end, the rest join the batch."""
        done = []
        for i, seq in enumerate(seqs):
            try:
                if self._next(seq, logits[i : i + 1]):
                    done.append(i)
            except Exception as exc:  # noqa: BLE001 - e.g. a logits processor of generation_config.json that cannot run
                seq.emit(exc)
                seq.failed = True
                done.append(i)
        for i in done:
            if seqs[i].request.session is not None and not seqs[i].failed:
                seqs[i].cache = row(cache, mask, i, self.backend.model.config)
            self.finish(seqs[i])
        keep = [i for i in range(len(seqs)) if i not in set(done)]
        if keep:
            cache, mask = select(cache, mask, keep)
            self.batch.join([seqs[i] for i in keep], cache, mask)

    # -- decode -----------------------------------------------------------------------------
    def decode(self) -> None:
        """One token for every running row, in one forward; the finished rows leave."""
        import torch

        b, batch = self.backend, self.batch
        rows = batch.rows
        mask = torch.cat([batch.mask, torch.ones(len(rows), 1, dtype=batch.mask.dtype, device=batch.mask.device)], dim=1)
        try:
            with forward_with(self.backend, [s.aid for s in rows]) as (model, extra):
                out = model(input_ids=torch.tensor([[s.ids[-1]] for s in rows], device=b.device), attention_mask=mask,
                            position_ids=torch.tensor([[s.fed] for s in rows], device=b.device), cache=batch.cache,
                            use_cache=True, logits_to_keep=1, **extra)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a failed step fails every row in it
            log.error("decode step failed for %d rows: %s", len(rows), exc, exc_info=exc)
            for seq in batch.drop():
                seq.emit(exc)
            return
        batch.mask = mask
        logits = out.logits[:, -1, :]
        done = []
        for i, seq in enumerate(rows):
            seq.fed += 1
            try:
                if self._next(seq, logits[i : i + 1]):
                    done.append(i)
            except Exception as exc:  # noqa: BLE001 - this row fails alone
                seq.emit(exc)
                seq.cancel.set()  # leaves with the finished rows, reported as failed already
                seq.failed = True
                done.append(i)
        if done:
            for seq in batch.leave(done, b.model.config):
                self.finish(seq)

    def _next(self, seq: Seq, logits: Any) -> bool:
        """Choose the next token as generate() would; True when the sequence is finished."""
        token = choose(seq, logits)
        seq.ids.append(token)
        if seq.text is not None and (piece := seq.text.put(token)):
            seq.emit(piece)
        request = seq.request
        return (token in self.eos and not request.ignore_eos) or seq.generated >= request.max_tokens or seq.cancel.is_set() or (
            bool(request.stop) and hit(self.backend.tokenizer, seq.ids[seq.prompt_len :][-seq.window :], request.stop))  # fmt: skip

    def finish(self, seq: Seq) -> None:
        """A sequence's end: its last text, the backend's commit (a session turn), then its result."""
        request, result = seq.request, seq.result
        if seq.failed:
            return
        try:
            if seq.cancel.is_set() and seq.generated < request.max_tokens:
                self.stats.cancelled += 1
            if seq.text is not None and (piece := seq.text.end()):
                seq.emit(piece)
            self.backend.finish(request, result, (seq.ids, seq.cache))
            if not seq.stream:
                seq.emit(result.text)
            seq.emit(result)
        except Exception as exc:  # noqa: BLE001 - e.g. a session that cannot be committed
            seq.emit(exc)
        seq.cache = None
