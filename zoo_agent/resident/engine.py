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
(`_compatible`). One waiting for such a batch stops admission until the running rows finish,
so neither side starves; building a per-row sum into peft's mixed forward was not worth a fork.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from zoo_agent.resident.wire.priority import PriorityQueue
from zoo_agent.resident.stops import StopFilter, hit, window

if TYPE_CHECKING:
    from zoo_agent.resident.backend import Generated, Request, TransformersBackend

__all__ = ["PREFILL_CHUNK", "Batcher", "Emit", "Serial", "batchable", "scheduler_for", "warm_up"]

log = logging.getLogger("zoo_agent.resident")

#: Prompt tokens fed per engine step: ~1.5 s on 2 CPU cores for the Qwen2-0.5B shape, so
#: running rows wait at most that long for a joining sequence's prefill.
PREFILL_CHUNK = 512

#: What a sequence hands back, in order: text pieces (str), then exactly one Generated or
#: one exception. Called on the engine's thread.
Emit = Callable[[Any], None]


@dataclass
class Stats:
    cancelled: int = 0  # requests whose client went away before they finished
    steps: int = 0


class Serial:
    """One generation at a time with ``generate()`` (``resources.max_batch: 1``): the previous
    behaviour, kept as the reference the batching engine is measured and tested against, and
    the path for models whose cache cannot be batched. With ``threads > 1`` (the Ollama
    backend, whose daemon batches itself) requests pass through concurrently.

    Waiting requests are served best first (issue #20): each pool job takes the best waiting
    request from the shared queue, not the one it was submitted with, so the pool's own FIFO
    only decides when a thread is free."""

    def __init__(self, backend: Any, threads: int = 1, aging_seconds: float = 10.0) -> None:
        self.backend, self.threads = backend, threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="generate")
        self.lock = threading.Lock()
        self.queue: PriorityQueue[_Job] = PriorityQueue(aging_seconds)
        self.running = 0
        self.stats = Stats()
        self.on_step: Callable[[int, int], None] | None = None
        self.clock: Callable[[], float] = time.monotonic  # arrival times: a test's own clock makes aging deterministic

    @property
    def waiting(self) -> int:
        return len(self.queue)

    @property
    def aging_seconds(self) -> float:
        return self.queue.aging_seconds

    @aging_seconds.setter
    def aging_seconds(self, value: float) -> None:
        with self.lock:
            self.queue.aging_seconds = value

    def waiting_by_class(self) -> dict[str, int]:
        with self.lock:
            return self.queue.counts_by_class()

    def submit(self, request: Request, result: Generated, cancel: threading.Event, emit: Emit, stream: bool = True) -> None:
        queued = self.clock()
        with self.lock:
            self.queue.push(_Job(request, result, cancel, emit, stream, queued), request.priority, queued)
        self.pool.submit(self._run_best)

    def _run_best(self) -> None:
        """One pool job: the best waiting request (one job is submitted per request, so each is served once)."""
        with self.lock:
            job = self.queue.pop_best()
            self.running += 1
        request, result, cancel, emit = job.request, job.result, job.cancel, job.emit
        result.queue_seconds = self.clock() - job.queued
        try:
            if cancel.is_set():  # its client left while it waited: nothing to generate
                self.stats.cancelled += 1
                return
            if job.stream:
                for piece in self.backend.stream(request, result, cancel):
                    emit(piece)
            else:
                emit(self.backend.complete(request, result, cancel))
            if cancel.is_set() and result.completion_tokens < request.max_tokens:
                self.stats.cancelled += 1
            emit(result)
        except BaseException as exc:  # noqa: BLE001 - handed to the request's coroutine
            emit(exc)
        finally:
            with self.lock:
                self.running -= 1

    def call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Between two generations (on the one thread; with several, beside them)."""
        return self.pool.submit(fn, *args)

    def stalled(self, seconds: float) -> bool:
        return False  # generate() reports no steps; the worker's event loop is the liveness signal

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass(eq=False)
class _Job:
    """A request waiting in Serial's queue."""

    request: Request
    result: Generated
    cancel: threading.Event
    emit: Emit
    stream: bool
    queued: float


def batchable(model: Any) -> str | None:
    """Why this model's cache cannot be batched here, or None when it can: left-padded rows
    need plain dynamic layers (a sliding-window or hybrid cache keeps per-layer offsets)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=model.config).layers
    odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
    return f"its cache has {', '.join(sorted(odd))} layers" if odd else None


def scheduler_for(backend: Any, max_batch: int) -> Serial | Batcher:
    """The batching engine where it can run; else generate() one at a time, or, for the Ollama
    daemon (which batches itself), up to ``max_batch`` requests passed through at once."""
    from zoo_agent.resident.backend import TransformersBackend

    if not isinstance(backend, TransformersBackend):
        return Serial(backend, threads=max_batch)
    if max_batch > 1:
        if (why := batchable(backend.model)) is None:
            return Batcher(backend, max_batch=max_batch)
        log.warning("%s: %s; serving one request at a time (resources.max_batch 1)", backend.version_dir.name, why)
    return Serial(backend)


def warm_up(scheduler: Serial | Batcher, timeout: float = 600.0) -> str:
    """A real one-token generation on the path requests take: READY means the model answers
    through it, not that files exist (issue #5)."""
    from zoo_agent.resident.backend import Generated, Request

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


class _Text:
    """Streamed text of one sequence: TextStreamer's decoding, then the stop filter."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        from transformers import TextStreamer

        pieces = self.pieces = list[str]()

        class Collect(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    pieces.append(text)

        self.streamer = Collect(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.stops = StopFilter(stops)

    def put(self, token: int) -> str:
        import torch

        self.streamer.put(torch.tensor([token]))  # type: ignore[no-untyped-call]
        return self._take()

    def end(self) -> str:
        self.streamer.end()  # type: ignore[no-untyped-call]
        return self._take() + self.stops.flush()

    def _take(self) -> str:
        text = "".join(self.stops.feed(p) for p in self.pieces)
        self.pieces.clear()
        return text


@dataclass(eq=False)
class _Seq:
    request: Request
    result: Generated
    cancel: threading.Event
    emit: Emit
    stream: bool
    queued: float
    ids: list[int] = field(default_factory=list)  # the prompt, then every token generated
    prompt_len: int = 0
    aid: str | None = None  # the adapter it runs with
    fed: int = 0  # prompt tokens already in its cache (a restored session starts above 0)
    cache: Any = None  # its own cache while it prefills; the batch's rows afterwards
    processors: Any = None
    sample: bool = False
    generator: Any = None
    text: _Text | None = None
    window: int = 0  # tokens decoded to look for a stop sequence
    failed: bool = False  # its exception was emitted: nothing more is

    @property
    def generated(self) -> int:
        return len(self.ids) - self.prompt_len


class Batcher:
    """The batching engine: ``submit`` from any thread; the model runs on the engine thread."""

    def __init__(self, backend: TransformersBackend, *, max_batch: int, prefill_chunk: int = PREFILL_CHUNK, aging_seconds: float = 10.0) -> None:
        self.backend, self.max_batch, self.prefill_chunk = backend, max_batch, prefill_chunk
        self.queue: PriorityQueue[_Seq] = PriorityQueue(aging_seconds)  # best first, then oldest (issue #20)
        self.clock: Callable[[], float] = time.monotonic  # arrival times: a test's own clock makes aging deterministic
        self.joining: deque[_Seq] = deque()  # admitted, prefilling
        self.rows: list[_Seq] = []  # decoding together
        self.mask: Any = None  # [rows, cache length]: 1 for a real token, 0 for left padding
        self.cache: Any = None  # the rows' DynamicCache
        self.calls: deque[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.last_step = time.monotonic()
        self.stats = Stats()
        self.on_step: Callable[[int, int], None] | None = None  # (rows decoded, tokens fed): the metrics
        self.eos = _eos_ids(backend)
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
            self.queue.push(_Seq(request, result, cancel, emit, stream, queued), request.priority, queued)
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
        deferred: list[_Seq] = []
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

    def _start(self, seq: _Seq, busy: frozenset[str]) -> Literal["joins", "busy", "alone"]:
        from zoo_agent.resident.adapters import AdaptersBusy

        b, request, result = self.backend, seq.request, seq.result
        inputs = b._inputs(request)
        seq.ids = inputs["input_ids"][0].tolist()
        seq.prompt_len = result.prompt_tokens = len(seq.ids)
        try:
            seq.aid = b._resolve(request, result, busy=busy)
        except AdaptersBusy:
            return "busy"
        if not self._compatible(seq.aid):
            return "alone"
        result.queue_seconds = self.clock() - seq.queued
        resume = b._session_begin(request, inputs, result)
        seq.cache = resume.get("cache")
        seq.fed = seq.cache.get_seq_length() if seq.cache is not None else 0
        seq.processors, seq.sample = _processors(b, request, seq.prompt_len)
        if seq.sample:
            import torch

            seq.generator = torch.Generator(device=b.device)
            seq.generator.manual_seed(request.seed if request.seed is not None else int(torch.randint(0, 2**62, (1,))))
        seq.text = _Text(b.tokenizer, request.stop) if seq.stream else None
        seq.window = window(request.stop)
        return "joins"

    def _compatible(self, aid: str | None) -> bool:
        """Whether a sequence running ``aid`` may join the batch now: a "sum" composition only
        joins rows of the same composition, and none joins those (see the module docstring)."""
        adapters = self.backend.adapters
        running = {s.aid for s in (*self.rows, *self.joining)}
        if adapters is None or not running or running == {aid}:
            return True
        return not (adapters.exclusive(aid) or any(adapters.exclusive(a) for a in running))

    @contextmanager
    def _model(self, aids: list[str | None]) -> Iterator[tuple[Any, dict[str, Any]]]:
        adapters = self.backend.adapters
        if adapters is None or adapters.peft is None:
            yield self.backend.model, {}
        elif len(set(aids)) == 1:
            with adapters.using(aids[0]) as model:
                yield model, {}
        else:  # peft's mixed batch: each row through its own adapter, "__base__" through none
            if any(adapters.exclusive(a) for a in aids):
                raise RuntimeError("a 'sum' composition was batched with other rows")  # _compatible forbids it: a bug
            yield adapters.peft, {"adapter_names": [a or "__base__" for a in aids]}

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

    def _prefill_chunk(self, seq: _Seq) -> int:
        import torch
        from transformers import DynamicCache

        b = self.backend
        chunk = seq.ids[seq.fed : seq.fed + self.prefill_chunk]
        if seq.cache is None:
            seq.cache = DynamicCache(config=b.model.config)
        try:
            with self._model([seq.aid]) as (model, extra):
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

    def _prefill_group(self, group: list[_Seq]) -> int:
        import torch
        from transformers import DynamicCache

        b = self.backend
        length = max(s.prompt_len for s in group)
        ids = torch.tensor([[0] * (length - s.prompt_len) + s.ids for s in group], device=b.device)
        mask = torch.tensor([[0] * (length - s.prompt_len) + [1] * s.prompt_len for s in group], device=b.device)
        cache = DynamicCache(config=b.model.config)
        try:
            with self._model([s.aid for s in group]) as (model, extra):
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

    def _first_tokens(self, seqs: list[_Seq], logits: Any, cache: Any, mask: Any) -> None:
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
                seqs[i].cache = _row(cache, mask, i, self.backend.model.config)
            self._finish(seqs[i])
        keep = [i for i in range(len(seqs)) if i not in set(done)]
        if keep:
            cache, mask = _select(cache, mask, keep)
            self._join([seqs[i] for i in keep], cache, mask)

    def _decode(self) -> None:
        import torch

        b, rows = self.backend, self.rows
        mask = torch.cat([self.mask, torch.ones(len(rows), 1, dtype=self.mask.dtype, device=self.mask.device)], dim=1)
        try:
            with self._model([s.aid for s in rows]) as (model, extra):
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

    def _next(self, seq: _Seq, logits: Any) -> bool:
        """Choose the next token as generate() would; True when the sequence is finished."""
        import torch

        scores = logits.to(dtype=torch.float32)
        if seq.processors:
            scores = seq.processors(torch.tensor([seq.ids], device=scores.device), scores)
        if seq.sample:
            token = int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=seq.generator)[0, 0])
        else:
            token = int(torch.argmax(scores, dim=-1)[0])
        seq.ids.append(token)
        if seq.text is not None and (piece := seq.text.put(token)):
            seq.emit(piece)
        request = seq.request
        return (token in self.eos and not request.ignore_eos) or seq.generated >= request.max_tokens or seq.cancel.is_set() or (
            bool(request.stop) and hit(self.backend.tokenizer, seq.ids[seq.prompt_len :][-seq.window :], request.stop))  # fmt: skip

    def _join(self, seqs: list[_Seq], cache: Any, mask: Any) -> None:
        """Prefilled rows join the batch's: both left-padded to one length."""
        import torch
        import torch.nn.functional as F

        if not self.rows:
            self.rows, self.cache, self.mask = list(seqs), cache, mask
            return
        length = max(self.mask.shape[1], mask.shape[1])
        pad_rows, pad_new = length - self.mask.shape[1], length - mask.shape[1]
        for layer, new in zip(self.cache.layers, cache.layers, strict=True):
            layer.keys = torch.cat([F.pad(layer.keys, (0, 0, pad_rows, 0)), F.pad(new.keys, (0, 0, pad_new, 0))])
            layer.values = torch.cat([F.pad(layer.values, (0, 0, pad_rows, 0)), F.pad(new.values, (0, 0, pad_new, 0))])
        self.mask = torch.cat([F.pad(self.mask, (pad_rows, 0)), F.pad(mask, (pad_new, 0))])
        self.rows.extend(seqs)

    def _leave(self, done: list[int]) -> None:
        """Finished rows leave; the padding no remaining row needs is cut off."""
        finished = [self.rows[i] for i in done]
        for i, seq in zip(done, finished, strict=True):
            if seq.request.session is not None and not seq.failed:
                seq.cache = _row(self.cache, self.mask, i, self.backend.model.config)
        keep = [i for i in range(len(self.rows)) if i not in set(done)]
        self.rows = [self.rows[i] for i in keep]
        if keep:
            self.cache, self.mask = _select(self.cache, self.mask, keep)
        else:
            self.cache = self.mask = None
        for seq in finished:
            self._finish(seq)

    def _finish(self, seq: _Seq) -> None:
        request, result = seq.request, seq.result
        if seq.failed:
            return
        try:
            if seq.cancel.is_set() and seq.generated < request.max_tokens:
                self.stats.cancelled += 1
            if seq.text is not None and (piece := seq.text.end()):
                seq.emit(piece)
            self.backend._finish(request, result, (seq.ids, seq.cache))
            if not seq.stream:
                seq.emit(result.text)
            seq.emit(result)
        except Exception as exc:  # noqa: BLE001 - e.g. a session that cannot be committed
            seq.emit(exc)
        seq.cache = None


def _select(cache: Any, mask: Any, keep: list[int]) -> tuple[Any, Any]:
    """Rows ``keep`` of a left-padded cache, without the padding none of them needs."""
    import torch

    index = torch.tensor(keep, device=mask.device)
    mask = mask.index_select(0, index)
    start = int(mask.any(dim=0).to(torch.int8).argmax())
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, start:]
        layer.values = layer.values.index_select(0, index)[:, :, start:]
    return cache, mask[:, start:]


def _row(cache: Any, mask: Any, i: int, config: Any) -> Any:
    """Row ``i`` alone, without its padding: what generate() would hand a session to save."""
    from transformers import DynamicCache

    start = int(mask.shape[1] - mask[i].sum())
    return DynamicCache([(layer.keys[i : i + 1, :, start:], layer.values[i : i + 1, :, start:]) for layer in cache.layers], config=config)


def _eos_ids(backend: Any) -> set[int]:
    eos = backend.model.generation_config.eos_token_id
    if eos is None:
        eos = backend.tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else ({int(eos)} if eos is not None else set())


def _processors(backend: Any, request: Request, prompt_len: int) -> tuple[Any, bool]:
    """The logits processors generate() would use for this request, and whether it samples.

    Built by generate's own (private, long-stable) helpers from the model's generation_config
    and the request's sampling: a repetition penalty, banned words or suppressed tokens in
    generation_config.json apply here exactly as there, and so do their failures."""
    model = backend.model
    config, _ = model._prepare_generation_config(None, **backend._sampling(request))
    model._prepare_special_tokens(config, True, device=backend.device, batch_size=1)
    return model._get_logits_processor(generation_config=config, input_ids_seq_length=prompt_len, device=backend.device), bool(config.do_sample)
