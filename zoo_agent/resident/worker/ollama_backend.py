"""The Ollama backend (issue #11): the daemon runs the model; the resident keeps it loaded
and puts the same OpenAI-compatible API, metrics and sd_notify in front of it.

Same surface as TransformersBackend (load, complete, stream, count_tokens, context_length), so the
worker and the API do not care which one runs. READY follows a real generation through
the daemon; `healthy()` is what the worker checks periodically: the model must show in
`/api/ps` (it is loaded again if the daemon dropped it) and the daemon must answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from zoo_agent.errors import BackendError, OllamaDown
from zoo_agent.resident.engine.base import Generated, Request

__all__ = ["OllamaBackend", "OllamaDown"]

KEEP_LOADED = -1  # keep_alive: never unload


class OllamaBackend:
    adapters = None
    selector = None
    sessions = None

    def __init__(self, name: str, host: str | None, timeout: float = 600.0) -> None:
        import ollama

        self.name = name if ":" in name else f"{name}:latest"
        self.host = host
        self.client = ollama.Client(host=host, timeout=timeout)
        self.device, self.dtype = "ollama", "daemon"

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        import httpx
        import ollama

        try:
            return fn(*args, **kwargs)
        except (ConnectionError, httpx.ConnectError, httpx.RemoteProtocolError) as exc:
            raise OllamaDown(f"the Ollama daemon at {self.host or '127.0.0.1:11434'} does not answer ({type(exc).__name__})") from exc
        except ollama.ResponseError as exc:
            raise BackendError(f"ollama:{self.name}: HTTP {exc.status_code}: {exc.error}") from exc

    def preread(self, on_progress: Callable[[int, int], None]) -> None:
        on_progress(1, 1)  # the daemon reads the weights itself

    def load(self) -> float:
        started = time.monotonic()
        self._call(self.client.show, self.name)  # 404 when it was never pulled: run zoo-agent apply
        self._call(self.client.generate, model=self.name, prompt="", keep_alive=KEEP_LOADED)
        return time.monotonic() - started

    def healthy(self) -> None:
        """Raises OllamaDown when the daemon is gone; loads the model again if the daemon dropped it."""
        running = [m.model for m in self._call(self.client.ps).models]
        if self.name not in running:
            self._call(self.client.generate, model=self.name, prompt="", keep_alive=KEEP_LOADED)

    def count_tokens(self, request: Request) -> int:
        """An estimate (4 characters a token): only the daemon knows its tokenizer; it bounds prompts, nothing else."""
        text = request.prompt if request.messages is None else " ".join(m["content"] for m in request.messages)
        return max(1, len(text or "") // 4)

    def _options(self, request: Request) -> dict[str, Any]:
        return {"num_predict": request.max_tokens, "temperature": request.temperature, "top_p": request.top_p,
                **({"top_k": request.top_k} if request.top_k else {}), **({"seed": request.seed} if request.seed is not None else {}),
                **({"stop": list(request.stop)} if request.stop else {})}  # fmt: skip

    def _parts(self, request: Request, stream: bool) -> Any:
        common = {"model": self.name, "options": self._options(request), "keep_alive": KEEP_LOADED, "stream": stream}
        if request.messages is not None:
            return self._call(self.client.chat, messages=request.messages, **common)
        return self._call(self.client.generate, prompt=request.prompt or "", **common)

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
        import httpx

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
        except (ConnectionError, httpx.TransportError) as exc:
            raise OllamaDown(f"the Ollama daemon at {self.host or '127.0.0.1:11434'} went away mid-answer ({type(exc).__name__})") from exc
        result.text = "".join(pieces)
