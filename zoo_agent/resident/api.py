"""The OpenAI-compatible HTTP API of a worker (issue #5): FastAPI, served by uvicorn.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
``stream: true`` as server-sent events ending in ``data: [DONE]``), GET /health and
GET /metrics (Prometheus; names follow vLLM's, prefixed ``zoo:``).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from .backend import Generated, TransformersBackend
from .backend import Request as GenRequest

__all__ = ["ServingState", "create_app"]

MAX_BODY = 1 << 20
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("zoo:time_to_first_token_seconds", "Time to first token.", registry=r, buckets=LATENCY_BUCKETS)
        self.itl = Histogram("zoo:inter_token_latency_seconds", "Time between streamed pieces.", registry=r, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("zoo:e2e_request_latency_seconds", "Request latency, end to end.", registry=r, buckets=LATENCY_BUCKETS)
        self.queue = Histogram("zoo:request_queue_time_seconds", "Time waiting for the model.", registry=r, buckets=LATENCY_BUCKETS)
        self.prompt_tokens = Counter("zoo:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("zoo:generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("zoo:request_success", "Finished requests.", ["finished_reason"], registry=r)
        self.running = Gauge("zoo:num_requests_running", "Requests generating now.", registry=r)
        self.waiting = Gauge("zoo:num_requests_waiting", "Requests waiting for the model.", registry=r)
        self.swap_seconds = Gauge("zoo:model_swap_seconds", "Load time of the serving version.", registry=r)
        self.reloads = Counter("zoo:reloads", "Reloads of this tenant, by result.", ["result"], registry=r)


@dataclass
class ServingState:
    tenant: str
    model: str
    version: str
    backend: TransformersBackend
    defaults: dict[str, Any]
    max_queue: int = 16
    max_tokens_limit: int = 4096
    max_prompt_tokens: int = 4096
    api_key: str | None = field(default=None, repr=False)
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False
    waiting: int = 0
    running: int = 0
    served: int = 0
    tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The one generation thread: requests queue here, in order (max_queue bounds the wait).
    generator: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="generate"))


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we ignore
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0)
    stream: bool = False
    ignore_eos: bool = Field(default=False, description="vLLM's extension: keep generating past end-of-sequence up to max_tokens.")


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)


class CompletionBody(_Body):
    prompt: str


def _error(status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error", "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(state: ServingState) -> FastAPI:
    app = FastAPI(title="model-zoo resident", version="1")

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return _error(400, f"{where}: {first['msg']}", param=where or None)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if int(request.headers.get("content-length") or 0) > MAX_BODY:
            return _error(400, f"body: larger than {MAX_BODY} bytes", param="body")
        if state.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not secrets.compare_digest(given.encode(), state.api_key.encode()):
                return JSONResponse({"error": {"message": "missing or wrong bearer token", "type": "authentication_error", "param": None, "code": "invalid_api_key"}}, status_code=401)
        response: Response = await call_next(request)
        if state.draining:
            response.headers["Connection"] = "close"  # clients move to the new worker, no reset
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"state": "draining" if state.draining else "ready", "tenant": state.tenant, "model": state.model, "version": state.version}
        return JSONResponse(body, status_code=503 if state.draining else 200)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(state.metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": state.tenant, "object": "model", "created": 0, "owned_by": "model-zoo", "root": f"{state.model}@{state.version}", "parent": None}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatBody) -> Response:
        return _serve(state, body, [m.model_dump() for m in body.messages], None, chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody) -> Response:
        return _serve(state, body, None, body.prompt, chat=False)

    return app


def _serve(state: ServingState, body: _Body, messages: list[dict[str, str]] | None, prompt: str | None, *, chat: bool) -> Response:
    if body.model not in (state.tenant, state.model):
        return _error(404, f"model '{body.model}' is not served here (serving '{state.tenant}')", param="model", code="model_not_found")
    if body.max_tokens is not None and body.max_tokens > state.max_tokens_limit:
        return _error(400, f"max_tokens: at most {state.max_tokens_limit}", param="max_tokens")
    if state.waiting + state.running > state.max_queue:
        return _error(429, f"queue full ({state.max_queue} waiting); retry", headers={"Retry-After": "1"})
    d = state.defaults
    request = GenRequest(
        messages, prompt, body.max_tokens or d["max_tokens"],
        d["temperature"] if body.temperature is None else body.temperature,
        body.top_p if body.top_p is not None else d["top_p"], d.get("top_k", 0),
        body.seed if body.seed is not None else d.get("seed"), body.ignore_eos,
    )  # fmt: skip
    prompt_tokens = state.backend.count_tokens(request)
    if prompt_tokens == 0:
        return _error(400, f"{'messages' if chat else 'prompt'}: encodes to no tokens", param="messages" if chat else "prompt")
    if prompt_tokens > state.max_prompt_tokens:
        return _error(400, f"{'messages' if chat else 'prompt'}: {prompt_tokens} tokens, at most {state.max_prompt_tokens}", param="messages" if chat else "prompt")
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    if body.stream:
        return StreamingResponse(_sse(_pieces(state, request), rid, state, chat), media_type="text/event-stream")
    return _Deferred(state, request, rid, chat)


class _Deferred(Response):
    """A non-streaming answer, computed when the response is sent (so the handler stays async)."""

    def __init__(self, state: ServingState, request: GenRequest, rid: str, chat: bool) -> None:
        super().__init__(media_type="application/json")
        self.args = (state, request, rid, chat)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        state, request, rid, chat = self.args
        text, result = "", Generated()
        async for piece in _pieces(state, request, stream=False):
            if isinstance(piece, Generated):
                result = piece
            else:
                text += piece
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens, "total_tokens": result.prompt_tokens + result.completion_tokens}
        choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        document = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                    "model": state.tenant, "system_fingerprint": f"{state.model}@{state.version}", "choices": [choice], "usage": usage}  # fmt: skip
        await JSONResponse(document)(scope, receive, send)


_END = object()


async def _pieces(state: ServingState, request: GenRequest, stream: bool = True) -> AsyncIterator[str | Generated]:
    """Text pieces, then the Generated summary. The generation runs on the one generation
    thread (the queue); this coroutine only awaits, so the event loop keeps answering."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue[Any]()
    cancel = threading.Event()
    m, queued = state.metrics, time.monotonic()
    m.waiting.inc()

    def job() -> None:
        with state.lock:
            state.waiting -= 1
            state.running += 1
        m.waiting.dec()
        m.running.inc()
        m.queue.observe(time.monotonic() - queued)
        result = Generated()
        try:
            if stream:
                for piece in state.backend.stream(request, result, cancel):
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            else:
                loop.call_soon_threadsafe(queue.put_nowait, state.backend.complete(request, result, cancel))
            loop.call_soon_threadsafe(queue.put_nowait, result)
        except BaseException as exc:  # noqa: BLE001 - handed to the request's coroutine
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            with state.lock:
                state.running -= 1
            m.running.dec()
            loop.call_soon_threadsafe(queue.put_nowait, _END)

    with state.lock:
        state.waiting += 1  # counted only once queued: nothing can leave it raised
    state.generator.submit(job)
    first = last = None
    try:
        while (item := await queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            now = time.monotonic()
            if isinstance(item, Generated):
                m.e2e.observe(now - queued)
                m.prompt_tokens.inc(item.prompt_tokens)
                m.generation_tokens.inc(item.completion_tokens)
                m.requests.labels(item.finish_reason).inc()
                with state.lock:
                    state.served += 1
                    state.tokens += item.completion_tokens
            elif first is None:
                first = now
                m.ttft.observe(now - queued)
            else:
                m.itl.observe(now - (last or now))
            last = now
            yield item
    finally:
        cancel.set()  # a client that went away stops its generation


async def _sse(pieces: AsyncIterator[str | Generated], rid: str, state: ServingState, chat: bool) -> AsyncIterator[str]:
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"
    fingerprint = f"{state.model}@{state.version}"  # which version answered: OpenAI's field for it

    def chunk(delta: str | None, finish: str | None) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat:
            choice["delta"] = {"content": delta} if delta is not None else {}
        else:
            choice["text"] = delta or ""
        return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": state.tenant,
                                      "system_fingerprint": fingerprint, "choices": [choice]}) + "\n\n"

    if chat:
        yield "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": state.tenant, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}) + "\n\n"
    async for piece in pieces:
        if isinstance(piece, Generated):
            yield chunk(None, piece.finish_reason)
        elif piece:
            yield chunk(piece, None)
    yield "data: [DONE]\n\n"
