"""One sequence of the batching engine (issue #19): its state, its streamed text, how its next
token is chosen, and which module its rows run through (issue #21: adapters and compositions)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from zoo_agent.resident.engine.base import AdapterSet, Emit, Generated, Model, Request
from zoo_agent.resident.engine.stops import StopFilter, window

__all__ = ["Seq", "Text", "begin", "choose", "compatible", "eos_ids", "forward_with", "processors"]


class Text:
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
class Seq:
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
    text: Text | None = None
    window: int = 0  # tokens decoded to look for a stop sequence
    failed: bool = False  # its exception was emitted: nothing more is

    @property
    def generated(self) -> int:
        return len(self.ids) - self.prompt_len


def begin(seq: Seq, backend: Model, inputs: Any) -> None:
    """An admitted sequence made ready to prefill: its session's restored cache, the logits
    processors and sampler generate() would use, its streamed text, its stop window."""
    request = seq.request
    resume = backend.session_begin(request, inputs, seq.result)
    seq.cache = resume.get("cache")
    seq.fed = seq.cache.get_seq_length() if seq.cache is not None else 0
    seq.processors, seq.sample = processors(backend, request, seq.prompt_len)
    if seq.sample:
        import torch

        seq.generator = torch.Generator(device=backend.device)
        seq.generator.manual_seed(request.seed if request.seed is not None else int(torch.randint(0, 2**62, (1,))))
    seq.text = Text(backend.tokenizer, request.stop) if seq.stream else None
    seq.window = window(request.stop)


def choose(seq: Seq, logits: Any) -> int:
    """The sequence's next token from the last position's logits, as generate() would choose it."""
    import torch

    scores = logits.to(dtype=torch.float32)
    if seq.processors:
        scores = seq.processors(torch.tensor([seq.ids], device=scores.device), scores)
    if seq.sample:
        return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=seq.generator)[0, 0])
    return int(torch.argmax(scores, dim=-1)[0])


def compatible(adapters: AdapterSet | None, running: set[str | None], aid: str | None) -> bool:
    """Whether a sequence running ``aid`` may join rows running ``running`` now: a "sum" composition
    only joins rows of the same composition, and none joins those (see batcher's docstring)."""
    if adapters is None or not running or running == {aid}:
        return True
    return not (adapters.exclusive(aid) or any(adapters.exclusive(a) for a in running))


@contextmanager
def forward_with(backend: Model, aids: list[str | None]) -> Iterator[tuple[Any, dict[str, Any]]]:
    """The module to run rows with adapters ``aids`` through, and the extra arguments it takes."""
    adapters = backend.adapters
    if adapters is None or adapters.peft is None:
        yield backend.model, {}
    elif len(set(aids)) == 1:
        with adapters.using(aids[0]) as model:
            yield model, {}
    else:  # peft's mixed batch: each row through its own adapter, "__base__" through none
        if any(adapters.exclusive(a) for a in aids):
            raise RuntimeError("a 'sum' composition was batched with other rows")  # compatible() forbids it: a bug
        yield adapters.peft, {"adapter_names": [a or "__base__" for a in aids]}


def eos_ids(backend: Model) -> set[int]:
    eos = backend.model.generation_config.eos_token_id
    if eos is None:
        eos = backend.tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else ({int(eos)} if eos is not None else set())


def processors(backend: Model, request: Request, prompt_len: int) -> tuple[Any, bool]:
    """The logits processors generate() would use for this request, and whether it samples.

    Built by generate's own (private, long-stable) helpers from the model's generation_config
    and the request's sampling: a repetition penalty, banned words or suppressed tokens in
    generation_config.json apply here exactly as there, and so do their failures."""
    model = backend.model
    config, _ = model._prepare_generation_config(None, **backend.sampling(request))
    model._prepare_special_tokens(config, True, device=backend.device, batch_size=1)
    return model._get_logits_processor(generation_config=config, input_ids_seq_length=prompt_len, device=backend.device), bool(config.do_sample)
