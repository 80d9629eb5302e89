"""The transformers backend: load a published version, warm it up, generate (issue #5).

Imported by the worker process only: this is where torch and transformers come in.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from zoo_agent.resident.config import WorkerConfig
from zoo_agent.resident.engine.base import AUTO, SET, Generated, Request
from zoo_agent.resident.engine.stops import StopFilter, criteria, cut
from zoo_agent.resident.sessions.prompt import conversation_ids, session_prompt
from zoo_agent.resident.sessions.store import Sessions, Turn
from zoo_agent.resident.sessions.transcript import SessionTurn
from zoo_agent.resident.worker.adapters import AdapterError, Adapters
from zoo_agent.resident.worker.prompt_bound import longest_token
from zoo_agent.resident.worker.selection import Composition, Selector, compose

__all__ = ["AdapterError", "TransformersBackend"]

log = logging.getLogger("zoo_agent.resident")

GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: a smaller temperature is greedy decoding
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class _Plain:
    """A tenant without adapters: the model itself, with the same `using` as Adapters."""

    def __init__(self, model: Any) -> None:
        self.model = model

    @contextmanager
    def using(self, aid: str | None) -> Iterator[Any]:
        yield self.model


class TransformersBackend:
    def __init__(self, version_dir: Path, *, allow_pickle: bool, allow_code: bool, device: str = "auto", dtype: str = "auto",
                 worker: WorkerConfig | None = None) -> None:  # fmt: skip
        self.version_dir = version_dir
        self.worker = worker  # adapters and selection, when the tenant declares them
        self.adapters: Adapters | None = None
        self.selector: Selector | None = None
        self.sessions: Sessions | None = None  # set by the worker: resident/tenants/<tenant>/
        self.allow_pickle, self.allow_code = allow_pickle, allow_code
        self.device_pref, self.dtype_pref = device, dtype
        self.model: Any = None
        self.tokenizer: Any = None
        self.device = "cpu"
        self.dtype = "float32"
        self.lock = threading.Lock()  # one generate() at a time (the engine's thread runs alone anyway)
        self._longest: tuple[int | None] | None = None  # longest_token's answer, once asked

    def preread(self, on_progress: Callable[[int, int], None]) -> None:
        """Read the weights once (into the page cache): real, measurable load progress,
        and a truncated or unreadable file shows up here, before READY could be sent."""
        files = sorted(p for p in self.version_dir.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
        total, done = sum(p.stat().st_size for p in files), 0
        buf = bytearray(8 << 20)
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    done += n
                    on_progress(done, total)
        on_progress(total, total)

    def load(self) -> float:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.monotonic()
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device_pref == "auto" else self.device_pref
        if self.dtype_pref == "auto":
            self.dtype = "float32" if self.device == "cpu" else ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
        else:
            self.dtype = self.dtype_pref
        common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": self.allow_code}
        self.tokenizer = AutoTokenizer.from_pretrained(self.version_dir, **common)
        model: Any = AutoModelForCausalLM.from_pretrained(
            self.version_dir, dtype=getattr(torch, self.dtype), use_safetensors=not self.allow_pickle, **common
        )
        self.model = model.to(self.device)
        self.model.eval()
        w = self.worker
        if w is not None:
            self.adapters = Adapters(self.model, w.adapters, max_loras=w.max_loras, base_names=w.base_names, refused=w.refused_adapters)
            self.adapters.preload()
            if w.selection is not None:
                self.selector = Selector(w.selection.embedding_dir, w.selection.threshold, self.device, max_adapters=w.selection.max_adapters)
                self.selector.index(list(w.adapters))
        return time.monotonic() - started

    def resolve(self, request: Request, result: Generated, busy: frozenset[str] = frozenset()) -> str | None:
        """Which adapter (or composition: its name) this request runs with, loading what is not
        resident, never evicting one in ``busy``."""
        aid = request.adapter
        if aid == SET:
            return self._compose_set(request.scaled, result, busy)
        if aid == AUTO:
            if self.selector is None:
                raise AdapterError("this tenant has no adapter_selection in the index")
            text = request.prompt or next((m["content"] for m in reversed(request.messages or []) if m["role"] == "user"), "")
            refused = frozenset(self.adapters.refused) if self.adapters is not None else frozenset()
            picked, result.similarity = self.selector.choose(text, exclude=refused | request.exclude)
            if len(picked) > 1:
                return self._compose(picked, result, busy)
            aid = picked[0][0] if picked else None
        if aid is None:
            return None
        if self.adapters is None:
            raise AdapterError(f"adapter '{aid}' is not declared for this tenant")
        self.adapters.load(aid, busy=busy)
        result.adapter = self.adapters.loaded[aid].label
        return aid

    def _compose(self, picked: list[tuple[str, float]], result: Generated, busy: frozenset[str]) -> str:
        """Two or more chosen adapters, composed as the index declares; ``result`` says which and how similar (x_zoo)."""
        assert self.adapters is not None and self.worker is not None and self.worker.selection is not None
        composition = compose(picked, self.worker.selection.combine)
        name = self.adapters.compose(composition, busy=busy)
        members = [self.adapters.loaded[aid] for aid in composition.ids]
        result.adapter, result.combine = composition.label([a.label for a in members]), composition.combine
        weights = composition.weights or (None,) * len(members)
        result.adapters = [{"id": a.id, "version": a.version, "similarity": round(similarity, 4), **({"weight": w} if w is not None else {})}
                           for a, (_, similarity), w in zip(members, picked, weights, strict=True)]  # fmt: skip
        return name

    def _compose_set(self, scaled: tuple[tuple[str, float], ...], result: Generated, busy: frozenset[str]) -> str:
        """The adapters the caller named, at its scales (issue #36): a "weighted" composition, whose
        weights are the scales (peft's add_weighted_adapter, "cat": exact); ``result`` says which (x_zoo)."""
        if self.adapters is None:
            raise AdapterError(f"adapter '{scaled[0][0]}' is not declared for this tenant (declared: none)")
        composition = Composition(tuple(aid for aid, _ in scaled), "weighted", tuple(scale for _, scale in scaled))
        name = self.adapters.compose(composition, busy=busy)  # declared and not refused, checked again here
        members = [self.adapters.loaded[aid] for aid in composition.ids]
        result.adapter, result.combine = composition.label([a.label for a in members]), composition.combine
        result.adapters = [{"id": a.id, "version": a.version, "scale": scale} for a, (_, scale) in zip(members, scaled, strict=True)]
        return name

    def load_adapter(self, aid: str) -> float:
        with self.lock:
            if self.adapters is None:
                raise AdapterError(f"adapter '{aid}' is not declared for this tenant (declared: none)")
            return self.adapters.load(aid)

    def unload_adapter(self, aid: str) -> None:
        with self.lock:
            if self.adapters is None:
                raise AdapterError(f"adapter '{aid}' is not loaded")
            self.adapters.unload(aid)

    def update_adapters(self, declared: tuple[Any, ...]) -> list[str]:
        """New adapter versions after an apply: swapped between two generations, never during one."""
        with self.lock:
            if self.adapters is None:
                return []
            changed = self.adapters.update(declared)
            if self.selector is not None:
                self.selector.index(list(self.adapters.declared.values()))
            return changed

    def _model(self) -> Any:
        return self.adapters if self.adapters is not None else _Plain(self.model)

    def inputs(self, request: Request) -> Any:
        if request.session is not None:  # exactly the ids the earlier turns saw and produced
            import torch

            turn = request.session
            ids = turn.prompt_ids if turn.prompt_ids is not None else conversation_ids(self.tokenizer, turn.history, turn.new_messages)
            tensor = torch.tensor([ids], device=self.device)
            return {"input_ids": tensor, "attention_mask": torch.ones_like(tensor)}
        if request.messages is not None:
            enc = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        else:
            enc = self.tokenizer(request.prompt or "", return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def context_length(self) -> int | None:
        """Prompt plus completion tokens the model's positions cover."""
        n = getattr(self.model.config, "max_position_embeddings", None)
        return int(n) if n else None

    def longest_token(self) -> int | None:
        """Characters one token covers at most (``prompt_bound``): a prompt refused before it is tokenized
        needs more tokens than fit. None for a tokenizer that keeps no such bound (or is not a fast one)."""
        if self._longest is None:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            self._longest = (longest_token(json.loads(backend.to_str())) if backend is not None else None,)
        return self._longest[0]

    def vocab_size(self) -> int:
        """Token ids a prompt may hold: rows of the input embedding."""
        return int(self.model.get_input_embeddings().num_embeddings)

    def session_prompt(self, history: list[SessionTurn], new_messages: list[dict[str, str]], budget: int | None, *,
                       native: Callable[[SessionTurn], bool] | None = None, preface: list[dict[str, str]] | None = None) -> tuple[int, list[int]]:  # fmt: skip
        """(turns dropped, prompt ids): the oldest turns left out until the prompt fits ``budget``."""
        return session_prompt(self.tokenizer, history, new_messages, budget, native=native, preface=preface)

    def truncate(self, text: str, tokens: int) -> str:
        """``text`` cut to at most ``tokens`` of this model's tokens."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= tokens else str(self.tokenizer.decode(ids[:tokens], skip_special_tokens=True))

    def count_tokens(self, request: Request) -> int:
        return int(self.inputs(request)["input_ids"].shape[1])

    def complete(self, request: Request, result: Generated, cancel: threading.Event | None = None) -> str:
        """The whole answer at once: no streamer, no per-token hand-off between threads."""
        import torch

        with self.lock:
            inputs = self.inputs(request)
            result.prompt_tokens = int(inputs["input_ids"].shape[1])
            aid = self.resolve(request, result)
            resume = self.session_begin(request, inputs, result)
            if request.seed is not None:
                torch.manual_seed(request.seed)
            with torch.inference_mode(), self._model().using(aid) as model:
                out = model.generate(**inputs, **self.sampling(request), stopping_criteria=self._criteria(request, result, cancel), **resume)
            self.finish(request, result, out)
            return result.text

    def _criteria(self, request: Request, result: Generated, cancel: threading.Event | None) -> Any:
        return criteria(cancel, self.tokenizer, request.stop, result.prompt_tokens)

    def sampling(self, request: Request) -> dict[str, Any]:
        """generate()'s sampling arguments, for generate() and the batcher alike. A temperature
        below ``GREEDY_BELOW`` is greedy: logits / 5e-324 overflow to inf and softmax gives NaN."""
        sample = request.temperature >= GREEDY_BELOW
        kwargs: dict[str, Any] = {"max_new_tokens": request.max_tokens, "do_sample": sample,
                                  "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id}  # fmt: skip
        if sample:
            kwargs.update(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k or None)
        if request.ignore_eos:
            kwargs["min_new_tokens"] = request.max_tokens  # end-of-sequence is suppressed until then
        return kwargs

    def finish(self, request: Request, result: Generated, out: Any) -> None:
        """The reply of a finished generation: ``out`` is generate()'s, or (ids, cache) from the batching engine."""
        if isinstance(out, tuple):
            ids, cache = out
        else:  # a session asks generate() for the cache too
            ids, cache = getattr(out, "sequences", out)[0].tolist(), getattr(out, "cache", None)
        new = ids[result.prompt_tokens :]
        result.completion_tokens = len(new)
        eos = self.tokenizer.eos_token_id
        result.finish_reason = "stop" if new and new[-1] == eos else ("length" if len(new) >= request.max_tokens else "stop")
        result.text = str(self.tokenizer.decode(new, skip_special_tokens=True))
        if (before := cut(result.text, request.stop)) is not None:
            # The session keeps every id generated (the cache covers them); the reply's text ends before the stop.
            result.text, result.finish_reason = before, "stop"
        if request.session is not None and self._store(request.session) is not None:
            self._session_end(request, result, ids, cache)

    def _store(self, turn: Turn) -> Sessions | None:
        """The turn's sessions: its route's (issue #21), else the tenant's."""
        return turn.store if turn.store is not None else self.sessions

    def session_begin(self, request: Request, inputs: Any, result: Generated) -> dict[str, Any]:
        """generate() arguments that continue a session from its saved cache, when that cache fits."""
        turn = request.session
        store = self._store(turn) if turn is not None else None
        if turn is None or store is None:
            return {}
        past = store.restore(turn, inputs["input_ids"][0].tolist(), result.adapter, self.model.config, self.device)
        stats = store.stats
        if past is not None:
            turn.cache = "restored"
            stats.restores += 1
        elif turn.cache != "none":  # earlier turns exist: they are prefilled again from the transcript
            turn.cache = "re-prefilled"
            stats.reprefills += 1
        return {"return_dict_in_generate": True, **({"cache": past} if past is not None else {})}

    def _session_end(self, request: Request, result: Generated, ids: list[int], cache: Any) -> None:
        """Commit the turn (durably, before the answer completes), then save the cache."""
        store = self._store(request.session) if request.session is not None else None
        assert request.session is not None and store is not None
        sampling = {"max_tokens": request.max_tokens, "temperature": request.temperature, "top_p": request.top_p,
                    "top_k": request.top_k, "seed": request.seed, **({"stop": list(request.stop)} if request.stop else {})}  # fmt: skip
        meta = {"sampling": sampling, "adapter": result.adapter, "finish_reason": result.finish_reason, "cache": request.session.cache}
        transcript = store.commit(request.session, result.text, ids[result.prompt_tokens:], meta)
        try:
            store.save_cache(request.session.id, ids, cache, result.adapter)
        except Exception as exc:  # noqa: BLE001 - the cache only accelerates; the turn is committed
            log.warning("session %s: cache not saved: %s", request.session.id, exc)
        store.timed_checkpoint(transcript)

    def stream(self, request: Request, result: Generated, cancel: threading.Event | None = None) -> Iterator[str]:
        """Generate, yielding text as it decodes; fills ``result`` with the token counts.
        Setting ``cancel`` stops the generation at the next token."""
        import torch
        from transformers import TextIteratorStreamer

        with self.lock:
            inputs = self.inputs(request)
            result.prompt_tokens = int(inputs["input_ids"].shape[1])
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            kwargs: dict[str, Any] = {**inputs, **self.sampling(request), "streamer": streamer,
                                      "stopping_criteria": self._criteria(request, result, cancel)}  # fmt: skip
            output: dict[str, Any] = {}
            aid = self.resolve(request, result)
            kwargs.update(self.session_begin(request, inputs, result))

            def run() -> None:
                try:
                    if request.seed is not None:
                        torch.manual_seed(request.seed)
                    with torch.inference_mode(), self._model().using(aid) as model:
                        output["ids"] = model.generate(**kwargs)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    output["error"] = exc
                    streamer.end()

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            stops = StopFilter(request.stop)
            for piece in streamer:
                if text := stops.feed(piece):
                    yield text
            if text := stops.flush():
                yield text
            thread.join()
            if "error" in output:
                raise output["error"]
            self.finish(request, result, output["ids"])
