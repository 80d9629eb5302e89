"""What the engine is built of (issue #32): the request and result values, the ``Scheduler``
that ``Serial`` and ``Batcher`` both implement (what the worker's app calls), and the
``Model`` a backend offers the engine (named methods, not the backend's privates).

No torch here: the worker's app and the Ollama backend import these types too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from zoo_agent.resident.sessions.store import Turn

__all__ = ["AUTO", "SET", "AdapterSet", "AdaptersBusy", "Emit", "Generated", "Generator", "Model", "Request", "Scheduler", "Stats"]

log = logging.getLogger("zoo_agent.resident")


@dataclass(frozen=True)
class Request:
    """One generation: a chat (messages) or a raw prompt, and the sampling parameters."""

    messages: list[dict[str, str]] | None
    prompt: str | None
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: always produce max_tokens (benchmarks, drain tests)
    adapter: str | None = None  # a declared adapter id, AUTO, SET, or None for the base model
    session: Turn | None = None  # a turn of a session: its cache is restored and the turn committed
    stop: tuple[str, ...] = ()  # OpenAI's stop sequences: the text ends before the first one
    priority: int = 0  # lower is served first, as vLLM's (resident/priority.py); last, so positional constructions keep working
    scaled: tuple[tuple[str, float], ...] = ()  # with SET: (adapter id, scale), composed in this order (issue #36)
    exclude: frozenset[str] = frozenset()  # with AUTO: adapters never chosen (issue #36)


AUTO = ":auto"  # choose the adapter by the request's text
SET = ":set"  # the adapters the caller named, at their scales (``Request.scaled``)


@dataclass
class Generated:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    adapter: str | None = None  # id@version of the adapter that ran (a composition: Composition.label)
    similarity: float | None = None  # with AUTO: the best adapter's cosine similarity
    combine: str | None = None  # a composition's: "sum" or "weighted"
    adapters: list[dict[str, Any]] = field(default_factory=list)  # a composition's: id, version, similarity (and weight), best first
    text: str = ""  # the reply, decoded once generation ended
    queue_seconds: float = 0.0  # from submission until it started generating


#: What a sequence hands back, in order: text pieces (str), then exactly one Generated or
#: one exception. Called on the engine's thread.
Emit = Callable[[Any], None]


@dataclass
class Stats:
    cancelled: int = 0  # requests whose client went away before they finished
    steps: int = 0



class AdaptersBusy(Exception):
    """Loading would evict an adapter that a running sequence uses: the request waits (not an error)."""


class AdapterSet(Protocol):
    """A tenant's loaded adapters as the engine uses them: which run alone, how to run one, and
    peft's model for a mixed batch (``None`` until an adapter is loaded)."""

    @property
    def peft(self) -> Any: ...

    def exclusive(self, name: str | None) -> bool: ...

    def using(self, aid: str | None) -> AbstractContextManager[Any]: ...


class Generator(Protocol):
    """A backend that generates one request at a time with its own loop (``generate()``, or
    the Ollama daemon's): all that ``Serial`` needs."""

    def stream(self, request: Request, result: Generated, cancel: threading.Event | None = None) -> Iterator[str]: ...

    def complete(self, request: Request, result: Generated, cancel: threading.Event | None = None) -> str: ...


class Model(Generator, Protocol):
    """What ``Batcher`` calls on the transformers backend: the model, its tokenizer and device,
    its adapters, and the steps of a generation the backend owns (the prompt's ids, the adapter
    a request runs with, a session's restored cache, the sampling parameters, the commit)."""

    @property
    def model(self) -> Any: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def device(self) -> Any: ...

    @property
    def adapters(self) -> AdapterSet | None: ...

    def inputs(self, request: Request) -> Any:
        """The tokenized prompt (``input_ids``, ``attention_mask``) on the model's device."""

    def resolve(self, request: Request, result: Generated, busy: frozenset[str] = frozenset()) -> str | None:
        """The adapter (or composition) the request runs with, recorded in ``result``."""

    def session_begin(self, request: Request, inputs: Any, result: Generated) -> dict[str, Any]:
        """A session turn's restored cache (``{"cache": ...}``), or nothing."""

    def sampling(self, request: Request) -> dict[str, Any]:
        """The request's sampling parameters as ``generate()`` takes them."""

    def finish(self, request: Request, result: Generated, out: Any) -> None:
        """Decode the reply into ``result`` and commit a session turn."""


class Scheduler(Protocol):
    """Where a worker's generations run, as the app sees it: ``Serial`` or ``Batcher``."""

    stats: Stats
    on_step: Callable[[int, int], None] | None  # (rows decoded, tokens fed): the metrics
    clock: Callable[[], float]
    aging_seconds: float

    @property
    def waiting(self) -> int: ...

    @property
    def running(self) -> int: ...

    def waiting_by_class(self) -> dict[str, int]: ...

    def submit(self, request: Request, result: Generated, cancel: threading.Event, emit: Emit, stream: bool = True) -> None: ...

    def call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]: ...

    def stalled(self, seconds: float) -> bool: ...

    def close(self) -> None: ...
