"""Continuous batching for the transformers backend (issue #19): sequences join and leave
a running batch between decode steps.

Why our own engine, not transformers' ``ContinuousBatchingManager``: that manager runs every
request under one generation config and one set of weights, so it has no per-request
sampling, no per-request LoRA adapter, no way to start a sequence from a session's saved
KV cache, and no priority. This is the smallest engine that has them, built from
transformers' own parts: ``DynamicCache``, the logits processors ``generate()`` would build
for the same request (so a model's ``generation_config.json`` means what it means there),
and ``TextStreamer``'s incremental decoding.

A step: one prefill, then one decode step of every running row together. A prefill takes
the joining sequences' prompts together in one left-padded forward, up to ``PREFILL_CHUNK``
tokens in all; a longer prompt, or a session turn continuing from its restored cache, is fed
alone, one chunk per step, so it never stalls the running rows for long. Rows are left-padded to a common cache length; the attention mask hides the
padding and each row gets its own position ids, so a row computes what it would alone
(up to floating-point summation order; the tests hold it to exact greedy tokens).

Everything that touches the model runs on the engine's one thread, so peft's global
``set_adapter`` cannot leak between requests. Adapter management (``call``) runs between
steps when no sequence is in flight: admission pauses until then.

Adapter compositions (issue #21): a "weighted" one is a peft adapter of its own, so its rows
mix with any others through ``adapter_names``. A "sum" one activates several adapters at once,
which ``adapter_names`` (one adapter per row) cannot say, and activating them for the whole
batch would run them on the other rows too: its sequences are decoded in a batch of their own
(``compatible``). One waiting for such a batch stops admission until the running rows finish,
so neither side starves; building a per-row sum into peft's mixed forward was not worth a fork.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Literal

from zoo_agent.resident.engine.base import AdaptersBusy, Emit, Generated, Model, Request, Stats, log
from zoo_agent.resident.engine.cache import join, row, select
from zoo_agent.resident.engine.sequence import Seq, begin, choose, compatible, eos_ids, forward_with
from zoo_agent.resident.engine.stops import hit
from zoo_agent.resident.priority import PriorityQueue

__all__ = ["PREFILL_CHUNK", "Batcher"]

#: Prompt tokens fed per engine step: ~1.5 s on 2 CPU cores for the Qwen2-0.5B shape, so
#: running rows wait at most that long for a joining sequence's prefill.
PREFILL_CHUNK = 512


class Batcher:
    """The batching engine: ``submit`` from any thread; the model runs on the engine thread."""

    def __init__(self, backend: Model, *, max_batch: int, prefill_chunk: int = PREFILL_CHUNK, aging_seconds: float = 10.0) -> None:
        self.backend, self.max_batch, self.prefill_chunk = backend, max_batch, prefill_chunk
        self.queue: PriorityQueue[Seq] = PriorityQueue(aging_seconds)  # best first, then oldest (issue #20)
        self.clock: Callable[[], float] = time.monotonic  # arrival times: a test's own clock makes aging deterministic
        self.joining: deque[Seq] = deque()  # admitted, prefilling
        self.rows: list[Seq] = []  # decoding together
        self.mask: Any = None  # [rows, cache length]: 1 for a real token, 0 for left padding
        self.cache: Any = None  # the rows' DynamicCache
        self.calls: deque[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.last_step = time.monotonic()
        self.stats = Stats()
        self.on_step: Callable[[int, int], None] | None = None  # (rows decoded, tokens fed): the metrics
        self.eos = eos_ids(backend)
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()

    # -- any thread -------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self.queue)

    @property
    def running(self) -> int:
        return len(self.rows) + len(self.joining)

    @property
    def aging_seconds(self) -> float:
        return self.queue.aging_seconds

    @aging_seconds.setter
    def aging_seconds(self, value: float) -> None:
        with self.cond:
            self.queue.aging_seconds = value

    def waiting_by_class(self) -> dict[str, int]:
        with self.cond:
            return self.queue.counts_by_class()

    def submit(self, request: Request, result: Generated, cancel: threading.Event, emit: Emit, stream: bool = True) -> None:
        with self.cond:
            queued = self.clock()
            self.queue.push(Seq(request, result, cancel, emit, stream, queued), request.priority, queued)
            self.cond.notify()

    def call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn`` on the engine thread once no sequence is in flight (new ones wait for it)."""
        future: Future[Any] = Future()
        with self.cond:
            self.calls.append((fn, args, future))
            self.cond.notify()
        return future

    def stalled(self, seconds: float) -> bool:
        """Work is in flight and no step finished for ``seconds``: the model hangs."""
        return bool(self.rows or self.joining) and time.monotonic() - self.last_step > seconds

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()

    # -- the engine thread ------------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        while True:
            with self.cond:
                while not (self.queue or self.joining or self.rows or self.calls or self.closed):
                    self.cond.wait()
                    self.last_step = time.monotonic()  # idle time is no stall
                if self.closed:
                    return
            fed = rows = 0
            try:
                with torch.inference_mode():
                    self._run_calls()
                    self._admit()
                    fed = self._prefill() if self.joining else 0
                    rows = len(self.rows)
                    if rows:
                        self._decode()
            except Exception as exc:  # noqa: BLE001 - a bug here must fail requests, never end the engine thread
                log.error("engine step failed: %s", exc, exc_info=exc)
                for seq in (*self.rows, *self.joining):
                    seq.emit(exc)
                self.rows, self.mask, self.cache = [], None, None
                self.joining.clear()
            self.stats.steps += 1
            self.last_step = time.monotonic()
            if self.on_step is not None and fed + rows:
                self.on_step(rows, fed + rows)

    def _run_calls(self) -> None:
        while self.calls and not (self.rows or self.joining):
            fn, args, future = self.calls.popleft()
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - the caller's to handle
                future.set_exception(exc)

    def _admit(self) -> None:
        """Waiting sequences join, best first (priority, aged; then oldest), while there is room and no call waits:
        priority decides admission into the running batch, never preempts a running row."""
        busy = {s.aid for s in (*self.rows, *self.joining) if s.aid is not None}
        deferred: list[Seq] = []
        while self.queue and not self.calls and self.running < self.max_batch:
            with self.cond:
                seq = self.queue.pop_best()
            if seq.cancel.is_set():
                self.stats.cancelled += 1
                continue
            try:
                started = self._start(seq, frozenset(busy))
            except Exception as exc:  # noqa: BLE001 - this request's failure (an adapter, a session), not the batch's
                seq.emit(exc)
                continue
            if started != "joins":
                deferred.append(seq)  # "busy": its adapter needs a slot that a running sequence holds
                if started == "alone":  # it needs a batch of its own: none joins before it
                    break
                continue
            if seq.aid is not None:
                busy.add(seq.aid)
            self.joining.append(seq)
        if deferred:
            with self.cond:  # back with their own arrival: they keep their place
                for seq in deferred:
                    self.queue.push(seq, seq.request.priority, seq.queued)

    def _start(self, seq: Seq, busy: frozenset[str]) -> Literal["joins", "busy", "alone"]:
        b, request, result = self.backend, seq.request, seq.result
        inputs = b.inputs(request)
        seq.ids = inputs["input_ids"][0].tolist()
        seq.prompt_len = result.prompt_tokens = len(seq.ids)
        try:
            seq.aid = b.resolve(request, result, busy=busy)
        except AdaptersBusy:
            return "busy"
        if not compatible(b.adapters, {s.aid for s in (*self.rows, *self.joining)}, seq.aid):
            return "alone"
        result.queue_seconds = self.clock() - seq.queued
        begin(seq, b, inputs)
        return "joins"

    def _prefill(self) -> int:
        """Prompts into the cache: fresh short prompts together in one left-padded forward (up to
        ``prefill_chunk`` tokens in all), else one chunk of the oldest (a long prompt, or a session
        turn continuing from its restored cache)."""
        seq = self.joining[0]
        if seq.cancel.is_set():
            self.joining.popleft()
            self._finish(seq)
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
            self._finish(seqs[i])
        keep = [i for i in range(len(seqs)) if i not in set(done)]
        if keep:
            cache, mask = select(cache, mask, keep)
            self._join([seqs[i] for i in keep], cache, mask)

    def _decode(self) -> None:
        import torch

        b, rows = self.backend, self.rows
        mask = torch.cat([self.mask, torch.ones(len(rows), 1, dtype=self.mask.dtype, device=self.mask.device)], dim=1)
        try:
            with forward_with(self.backend, [s.aid for s in rows]) as (model, extra):
                out = model(input_ids=torch.tensor([[s.ids[-1]] for s in rows], device=b.device), attention_mask=mask,
                            position_ids=torch.tensor([[s.fed] for s in rows], device=b.device), cache=self.cache,
                            use_cache=True, logits_to_keep=1, **extra)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a failed step fails every row in it
            log.error("decode step failed for %d rows: %s", len(rows), exc, exc_info=exc)
            for seq in rows:
                seq.emit(exc)
            self.rows, self.mask, self.cache = [], None, None
            return
        self.mask = mask
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
            self._leave(done)

    def _next(self, seq: Seq, logits: Any) -> bool:
        """Choose the next token as generate() would; True when the sequence is finished."""
        token = choose(seq, logits)
        seq.ids.append(token)
        if seq.text is not None and (piece := seq.text.put(token)):
            seq.emit(piece)
        request = seq.request
        return (token in self.eos and not request.ignore_eos) or seq.generated >= request.max_tokens or seq.cancel.is_set() or (
            bool(request.stop) and hit(self.backend.tokenizer, seq.ids[seq.prompt_len :][-seq.window :], request.stop))  # fmt: skip

    def _join(self, seqs: list[Seq], cache: Any, mask: Any) -> None:
        """Prefilled rows join the batch's: both left-padded to one length."""
        if not self.rows:
            self.rows, self.cache, self.mask = list(seqs), cache, mask
            return
        self.cache, self.mask = join(self.cache, self.mask, cache, mask)
        self.rows.extend(seqs)

    def _leave(self, done: list[int]) -> None:
        """Finished rows leave; the padding no remaining row needs is cut off."""
        finished = [self.rows[i] for i in done]
        for i, seq in zip(done, finished, strict=True):
            if seq.request.session is not None and not seq.failed:
                seq.cache = row(self.cache, self.mask, i, self.backend.model.config)
        keep = [i for i in range(len(self.rows)) if i not in set(done)]
        self.rows = [self.rows[i] for i in keep]
        if keep:
            self.cache, self.mask = select(self.cache, self.mask, keep)
        else:
            self.cache = self.mask = None
        for seq in finished:
            self._finish(seq)

    def _finish(self, seq: Seq) -> None:
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
