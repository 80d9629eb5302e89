"""The Ollama backend (issue #11): the daemon runs the model; the resident keeps it loaded
and puts the same OpenAI-compatible API, metrics and sd_notify in front of it.

Same surface as TransformersBackend (load, complete, stream, count_tokens, context_length), so the
worker and the API do not care which one runs. READY follows a real generation through
the daemon; `healthy()` is what the worker checks periodically: the model must show in
`/api/ps` (it is loaded again if the daemon dropped it) and the daemon must answer.

The daemon being away (refused, timing out, 5xx, or no longer holding the model: a 404) is
transient for this tenant only (issue #35, ``worker/daemon.py``): every call goes through
``_call``, which marks ``daemon`` away and raises ``Away`` (answered 503 with Retry-After);
while it is away requests are refused before they reach the daemon, and ``load`` at start
leaves the tenant unavailable instead of failing the worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from zoo_agent.errors import BackendError, OllamaDown
from zoo_agent.resident.engine.base import Generated, Request, log
from zoo_agent.resident.worker.daemon import Availability, Away, mark

__all__ = ["OllamaBackend", "OllamaDown"]

KEEP_LOADED = -1  # keep_alive: never unload
#: Seconds the health checks (``/api/ps``, ``/api/show``) wait: a daemon that hangs is away, not awaited for 10 minutes.
PROBE_SECONDS = 10.0


class OllamaBackend:
    adapters = None
    selector = None
    sessions = None

    def __init__(self, name: str, host: str | None, timeout: float = 600.0, *, tenant: str | None = None, retry_cap: float = 5.0,
                 num_ctx: int | None = None) -> None:  # fmt: skip
        import ollama

        # The tenant's max_context as the daemon's num_ctx, on every call: the daemon loads the model again
        # whenever a request's num_ctx differs from the loaded one, so the load and warm-up carry it too.
        self.context: dict[str, Any] = {"num_ctx": num_ctx} if num_ctx is not None else {}
        self.name = name if ":" in name else f"{name}:latest"
        self.host = host
        self.client = ollama.Client(host=host, timeout=timeout)
        self.probe = ollama.Client(host=host, timeout=min(timeout, PROBE_SECONDS))
        self.device, self.dtype = "ollama", "daemon"
        self.daemon = Availability(tenant or self.name, host or "127.0.0.1:11434", cap=retry_cap)

    def _call(self, fn: Callable[..., Any], *args: Any, request: bool = False, **kwargs: Any) -> Any:
        """One call to the daemon: its being away (refused, a timeout, 5xx, the model gone) marks it so and
        raises ``Away``. ``request``: a client's generation, whose failure may be its own (see ``_failure``)."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            failure = self._failure(exc, request=request)
            if failure is exc:
                raise
            raise failure from exc

    def _failure(self, exc: Exception, mid_answer: bool = False, request: bool = False) -> Exception:
        """What a failed call means: ``Away`` for the daemon's being away, ``BackendError`` for a request it failed.

        A refused connection is the daemon's. Anything else a client's request met (a 5xx, a 404, a
        timeout, a connection broken mid-answer) may be that request's own doing (a generation the
        daemon cannot run, one slower than the timeout): the daemon is asked once (``/api/show``, the
        short timeout) and the tenant is marked away only when that fails too, so no client can take
        the tenant away from the others."""
        import httpx
        import ollama

        where = f"the Ollama daemon at {self.daemon.address}"
        if isinstance(exc, (ConnectionError, httpx.ConnectError)):
            return self._away(f"{where} does not answer ({type(exc).__name__})")
        if isinstance(exc, httpx.TransportError):
            why = f"{where} {'went away mid-answer' if mid_answer else 'does not answer'} ({type(exc).__name__})"
        elif isinstance(exc, ollama.ResponseError) and exc.status_code == 404:
            why = f"{where} does not have {self.name} (HTTP 404; zoo-agent apply pulls it again)"
        elif isinstance(exc, ollama.ResponseError) and exc.status_code >= 500:
            why = f"{where} answered HTTP {exc.status_code}: {' '.join(str(exc.error).split())[:200]}"
        elif isinstance(exc, ollama.ResponseError):
            return BackendError(f"ollama:{self.name}: HTTP {exc.status_code}: {exc.error}")
        else:
            return exc
        if not request:
            return self._away(why)
        if self._answers():
            return BackendError(f"ollama:{self.name}: {why.removeprefix(where + ' ')}, and it answers otherwise: this request failed")
        refusal = self.daemon.refusal()  # marked by the check, with its own reason
        return refusal if refusal is not None else self._away(why)

    def _answers(self) -> bool:
        """Whether the daemon answers and has the model (``Away``, marked, when it does not)."""
        try:
            self._call(self.probe.show, self.name)
        except Away:
            return False
        return True

    def _away(self, why: str) -> Away:
        mark(self.daemon, why)
        refusal = self.daemon.refusal()
        return refusal if refusal is not None else Away(why, 1)

    def preread(self, on_progress: Callable[[int, int], None]) -> None:
        on_progress(1, 1)  # the daemon reads the weights itself

    def load(self) -> float:
        """The model loaded in the daemon; a daemon away at start leaves the tenant unavailable (its
        worker serves 503s and tries again), never failed: it is another service (issue #35)."""
        started = time.monotonic()
        try:
            self.load_now()
        except Away:
            log.warning("%s: starting unavailable: %s", self.daemon.tenant, self.daemon.why)
        return time.monotonic() - started

    def load_now(self) -> None:
        """Ask the daemon for the model (404 when it was never pulled, or was removed: zoo-agent apply
        pulls it) and load it for good; raises ``Away`` when it cannot."""
        self._call(self.probe.show, self.name)
        self._call(self.client.generate, model=self.name, prompt="", keep_alive=KEEP_LOADED, options=self.context or None)

    def healthy(self) -> None:
        """Raises ``Away`` when the daemon is gone; loads the model again if the daemon dropped it."""
        running = [m.model for m in self._call(self.probe.ps).models]
        if self.name not in running:
            self._call(self.client.generate, model=self.name, prompt="", keep_alive=KEEP_LOADED, options=self.context or None)

    def count_tokens(self, request: Request) -> int:
        """An estimate (4 characters a token): only the daemon knows its tokenizer; it bounds prompts, nothing else."""
        text = request.prompt if request.messages is None else " ".join(m["content"] for m in request.messages)
        return max(1, len(text or "") // 4)

    def _options(self, request: Request) -> dict[str, Any]:
        return {**self.context, "num_predict": request.max_tokens, "temperature": request.temperature, "top_p": request.top_p,
                **({"top_k": request.top_k} if request.top_k else {}), **({"seed": request.seed} if request.seed is not None else {}),
                **({"stop": list(request.stop)} if request.stop else {})}  # fmt: skip

    def _parts(self, request: Request, stream: bool) -> Any:
        if (refusal := self.daemon.refusal()) is not None:
            raise refusal  # away: not asked again per request (the watcher asks, with backoff)
        common = {"model": self.name, "options": self._options(request), "keep_alive": KEEP_LOADED, "stream": stream}
        if request.messages is not None:
            return self._call(self.client.chat, messages=request.messages, request=True, **common)
        return self._call(self.client.generate, prompt=request.prompt or "", request=True, **common)

    @staticmethod
    def _text(part: Any) -> str:
        message = getattr(part, "message", None)
        return str(message.content or "") if message is not None else str(getattr(part, "response", "") or "")

    @staticmethod
    def _summary(part: Any, result: Generated) -> None:
        result.prompt_tokens = int(part.prompt_eval_count or 0)
        result.completion_tokens = int(part.eval_count or 0)
        result.finish_reason = "length" if part.done_reason == "length" else "stop"

    def context_length(self) -> int | None:
        return None  # the daemon's num_ctx; it truncates itself

    def complete(self, request: Request, result: Generated, cancel: threading.Event | None = None) -> str:
        part = self._parts(request, stream=False)
        self._summary(part, result)
        result.text = self._text(part)
        return result.text

    def stream(self, request: Request, result: Generated, cancel: threading.Event | None = None) -> Iterator[str]:
        pieces = []
        try:
            for part in self._parts(request, stream=True):
                if cancel is not None and cancel.is_set():
                    break
                if text := self._text(part):
                    pieces.append(text)
                    yield text
                if part.done:
                    self._summary(part, result)
        except Away:
            raise
        except Exception as exc:  # a streamed answer fails as it is read: the same meanings as _call's
            failure = self._failure(exc, mid_answer=bool(pieces), request=True)
            if failure is exc:
                raise
            raise failure from exc
        result.text = "".join(pieces)
