"""The OpenAI-compatible HTTP API of a worker (issue #5): FastAPI, served by uvicorn.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
``stream: true`` as server-sent events ending in ``data: [DONE]``), GET /health and
GET /metrics (Prometheus; names follow vLLM's, prefixed ``zoo:``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from zoo_agent.jsonbound import JSONRefused, loads
from zoo_agent.resident.backend import AUTO, AdapterError, Generated, TransformersBackend
from zoo_agent.resident.backend import Request as GenRequest
from zoo_agent.resident.engine import scheduler_for
from zoo_agent.resident.wire.gate import Gate
from zoo_agent.resident.wire.http import ApiError
from zoo_agent.resident.wire.headers import PRIORITY as HEADER
from zoo_agent.resident.wire.headers import SESSION_ROUTE as ROUTE_HEADER
from zoo_agent.resident.wire.priority import CLASSES, MAX_PRIORITY, MIN_PRIORITY, BadPriority, parse_priority
from zoo_agent.resident.sessions import SessionDamaged, SessionError, Sessions, Turn, valid_id
from zoo_agent.resident.summaries import (
    NeedSummary,
    Summarizer,
    SummaryFailed,
    condensed,
    marker_message,
    summary_message,
)
from zoo_agent.resident.transcript import MAX_SEED, SessionFile, SessionSummary, Text
from zoo_agent.formats import now

__all__ = ["ServingState", "create_app"]

log = logging.getLogger("zoo_agent.resident")

MAX_BODY = 1 << 20
MAX_STOP_CHARS = 256
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


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
        self.cancelled = Counter("zoo:request_cancelled", "Requests whose client went away; generation stopped early.", registry=r)
        self.running = Gauge("zoo:num_requests_running", "Requests generating now (prefilling or in the decode batch).", registry=r)
        self.batch = Histogram("zoo:decode_batch_size", "Sequences decoded together per engine step.", registry=r, buckets=BATCH_BUCKETS)
        self.iteration_tokens = Histogram("zoo:iteration_tokens_total", "Tokens fed to the model per engine step (prompt chunk plus decoded rows).",
                                          registry=r, buckets=TOKEN_BUCKETS)  # fmt: skip
        self.waiting = Gauge("zoo:num_requests_waiting", "Requests waiting for the model.", registry=r)
        self.waiting_by_priority = Gauge("zoo:num_requests_waiting_by_priority", "Requests waiting for the model, by priority class (X-Zoo-Priority).",
                                         ["priority"], registry=r)  # fmt: skip
        self.swap_seconds = Gauge("zoo:model_swap_seconds", "Load time of the serving version.", registry=r)
        self.reloads = Counter("zoo:reloads", "Reloads of this tenant, by result.", ["result"], registry=r)
        self.lora_loaded = Gauge("zoo:lora_adapters_loaded", "LoRA adapters resident now.", registry=r)
        self.lora_loads = Counter("zoo:lora_loads", "LoRA adapter loads, by result.", ["result"], registry=r)
        self.lora_swaps = Counter("zoo:lora_swaps", "LoRA adapters swapped to a new version in place.", registry=r)
        self.lora_seconds = Histogram("zoo:lora_load_seconds", "Seconds to load or swap a LoRA adapter.", registry=r, buckets=LATENCY_BUCKETS)
        self.session_restores = Counter("zoo:session_cache_restores", "Session turns continued from a saved KV cache.", registry=r)
        self.session_reprefills = Counter("zoo:session_reprefills", "Session turns prefilled again from the transcript.", registry=r)
        self.session_corrupt = Counter("zoo:session_cache_corrupt", "Damaged session caches ignored.", registry=r)
        self.session_restore_seconds = Histogram("zoo:session_restore_seconds", "Seconds to load a session's KV cache.", registry=r, buckets=LATENCY_BUCKETS)
        self.lora_selections = Counter("zoo:lora_selections", "Adapters chosen for '<tenant>:auto' ('base' when none qualified), "
                                       "each adapter of a composition counted.", ["adapter"], registry=r)  # fmt: skip
        # As vLLM's lora_requests_info names its adapters: one label, comma-joined (sorted, so one set is one series).
        self.lora_compositions = Counter("zoo:lora_composition_requests", "Requests answered by a composition of adapters.",
                                         ["combine", "adapters"], registry=r)  # fmt: skip
        self.lora_compositions_cached = Gauge("zoo:lora_compositions_cached", "Adapter compositions cached now.", registry=r)
        self.lora_compositions_built = Counter("zoo:lora_compositions_built", "Weighted compositions built (add_weighted_adapter).", registry=r)


@dataclass
class ServingState:
    tenant: str
    model: str
    version: str
    backend: TransformersBackend  # or OllamaBackend: the same surface
    defaults: dict[str, Any]
    max_queue: int = 16
    max_batch: int = 16  # sequences decoded together (1: one generate() at a time)
    max_tokens_limit: int = 4096
    max_prompt_tokens: int = 4096
    priority: int = 0  # the tenant's default class for requests that name none (resident/priority.py)
    aging_seconds: float = 10.0  # a waiting request gains one class per this many seconds
    api_key: str | None = field(default=None, repr=False)
    route_sessions: dict[str, Sessions] = field(default_factory=dict)  # route id -> its sessions (issue #21)
    summarizers: dict[str, Summarizer] = field(default_factory=dict)  # route id -> its summarizer
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False
    preparing: int = 0  # event loop only
    served: int = 0
    tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Where generations run: the batching engine, or one generate() at a time (engine.scheduler_for).
    scheduler: Any = None
    # Sessions read and prompts tokenized, one at a time, beside the generation thread (never on the event loop).
    preparer: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="prepare"))
    _counted: dict[str, int] = field(default_factory=dict)  # backend totals already added to the metrics
    exit_code: int = 0  # the worker's, when something ends it (the ollama daemon went away)

    def __post_init__(self) -> None:
        if self.scheduler is None:
            self.scheduler = scheduler_for(self.backend, self.max_batch)
        self.scheduler.aging_seconds = self.aging_seconds  # the worker builds its scheduler before the state: set here, once
        m = self.metrics

        def observe(rows: int, tokens: int) -> None:  # on the engine's thread; prometheus_client is thread-safe
            if rows:
                m.batch.observe(rows)
            m.iteration_tokens.observe(tokens)

        self.scheduler.on_step = observe

    @property
    def waiting(self) -> int:
        return int(self.scheduler.waiting)

    @property
    def running(self) -> int:
        return int(self.scheduler.running)

    def sync_metrics(self) -> None:
        """Adapter, session and engine counters live beside the model (engine thread); totals are added here."""
        m = self.metrics
        m.running.set(self.running)
        m.waiting.set(self.waiting)
        for name, count in self.scheduler.waiting_by_class().items():
            m.waiting_by_priority.labels(name).set(count)
        self._add(m.cancelled, self.scheduler.stats.cancelled, "cancelled")
        if (sessions := self.backend.sessions) is not None:
            ss = sessions.stats
            for seconds in ss.restore_seconds:
                m.session_restore_seconds.observe(seconds)
            ss.restore_seconds.clear()
            self._add(m.session_restores, ss.restores, "restores")
            self._add(m.session_reprefills, ss.reprefills, "reprefills")
            self._add(m.session_corrupt, ss.corrupt, "corrupt")
        if (adapters := self.backend.adapters) is not None:
            st = adapters.stats
            m.lora_loaded.set(len(adapters.loaded))
            for seconds in st.seconds:
                m.lora_seconds.observe(seconds)
            st.seconds.clear()
            self._add(m.lora_loads.labels("ok"), st.loads, "loads")
            self._add(m.lora_loads.labels("failed"), st.load_failures, "load_failures")
            self._add(m.lora_swaps, st.swaps, "swaps")
            m.lora_compositions_cached.set(len(adapters.compositions))
            self._add(m.lora_compositions_built, st.compositions_built, "compositions_built")

    def _add(self, counter: Any, total: int, key: str) -> None:
        counter.inc(max(0, total - self._counted.get(key, 0)))
        self._counted[key] = total


StopText = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = Field(default=False, description="OpenAI's: a last chunk, with no choices, carries the usage.")


class _Body(BaseModel):
    """Strict types (``max_tokens: true`` or ``"5"`` is a 400 naming the field, never a guess), text
    that is Unicode (a lone surrogate made a 500), a seed torch can take (2^64 made a 500) (issue #17)."""

    model_config = ConfigDict(extra="allow", strict=True)  # OpenAI clients send fields we ignore
    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = Field(
        default=None, description="Up to 4 sequences: the text ends before the first one generated, finish_reason 'stop'.")
    n: int = Field(default=1, description="Completions per request; only 1 is supported.")
    ignore_eos: bool = Field(default=False, description="vLLM's extension: keep generating past end-of-sequence up to max_tokens.")
    priority: int | None = Field(default=None, ge=MIN_PRIORITY, le=MAX_PRIORITY,
                                 description=f"vLLM's: lower is served first ({', '.join(f'{k} {v}' for k, v in CLASSES.items())}); "
                                             f"the {HEADER} header wins over it; default: the tenant's.")  # fmt: skip

    @field_validator("n")
    @classmethod
    def _one(cls, n: int) -> int:
        if n != 1:
            raise PydanticCustomError("n", "only n=1 is supported; send the request again for another completion")
        return n

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class Message(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    session: Text | None = Field(default=None, description="Our extension: append this exchange to a session (created on first use).")


class CompletionBody(_Body):
    prompt: Text


#: Parsed by parse_priority, not by FastAPI, so that a bad value's 400 names the header and the allowed classes.
PriorityHeader = Annotated[str | None, Header(alias=HEADER, description=f"The request's class: {', '.join(CLASSES)} (issue #20).")]
RouteHeader = Annotated[str | None, Header(alias=ROUTE_HEADER, include_in_schema=False)]


class LoadLoraBody(BaseModel):
    """vLLM's body; ``lora_name`` must be an adapter id declared for this tenant."""

    lora_name: str
    lora_path: str | None = None


def _error(status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ApiError(status, message, param, code).document(), status_code=status, headers=headers)


class _BoundedRequest(Request):
    """A request whose body FastAPI reads with the one bounded JSON reader (issue #31): a body
    nested 100,000 levels deep, not UTF-8 or not JSON is a 400 naming ``body`` and saying why."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = loads(await self.body())
            except JSONRefused as exc:
                raise StarletteHTTPException(400, detail=str(exc)) from None
        return self._json


class _BoundedRoute(APIRoute):
    """Every route's request is a ``_BoundedRequest`` (FastAPI's documented way to change how a body is read)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            return await handler(_BoundedRequest(request.scope, request.receive))

        return bounded


def create_app(state: ServingState) -> FastAPI:
    app = FastAPI(title="model-zoo resident", version="1")
    app.router.route_class = _BoundedRoute  # before the first route

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        if not where:  # the body as a whole: not an object, or not read as JSON at all (FastAPI's strict Content-Type)
            return _error(400, "body: must be a JSON object, sent with Content-Type: application/json", param="body")
        return _error(400, f"{where}: {first['msg']}", param=where)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """OpenAI's error shape for what Starlette answers itself (a body that is not JSON or not UTF-8, no such route)."""
        return _error(exc.status_code, f"body: {exc.detail}" if exc.status_code == 400 else str(exc.detail),
                      param="body" if exc.status_code == 400 else None, headers=getattr(exc, "headers", None))  # fmt: skip

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        if state.draining:
            response.headers["Connection"] = "close"  # clients move to the new worker, no reset
        return response

    app.add_middleware(Gate, max_body=MAX_BODY, api_key=state.api_key)  # outermost: auth and body limit before anything reads

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"state": "draining" if state.draining else "ready", "tenant": state.tenant, "model": state.model, "version": state.version}
        return JSONResponse(body, status_code=503 if state.draining else 200)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        state.sync_metrics()
        return PlainTextResponse(generate_latest(state.metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        def card(mid: str, root: str, parent: str | None) -> dict[str, Any]:
            return {"id": mid, "object": "model", "created": 0, "owned_by": "model-zoo", "root": root, "parent": parent}

        data = [card(state.tenant, f"{state.model}@{state.version}", None)]
        adapters = state.backend.adapters
        if adapters is not None:  # as vLLM lists LoRA modules: own ids, parent = the base
            data += [card(f"{state.tenant}:{aid}", a.label, state.tenant) for aid, a in adapters.declared.items() if aid not in adapters.refused]
        if state.backend.selector is not None:
            data.append(card(f"{state.tenant}:auto", "chosen per request", state.tenant))
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter", response_model=None)
    async def load_lora(body: LoadLoraBody) -> Response:
        return await _manage_lora(state, body, load=True)

    @app.post("/v1/unload_lora_adapter", response_model=None)
    async def unload_lora(body: LoadLoraBody) -> Response:
        return await _manage_lora(state, body, load=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatBody, x_zoo_priority: PriorityHeader = None, x_zoo_session_route: RouteHeader = None) -> Response:
        return await _serve(state, body, [m.model_dump() for m in body.messages], None, chat=True, priority=x_zoo_priority,
                            route=x_zoo_session_route)  # fmt: skip

    @app.get("/v1/sessions/{sid}", response_model=None)
    async def get_session(sid: str) -> Response:
        found = _session_or_error(state, sid)
        return found if isinstance(found, JSONResponse) else JSONResponse(found)

    @app.delete("/v1/sessions/{sid}", response_model=None)
    async def delete_session(sid: str) -> Response:
        """Deletes a damaged session too: that is how one is repaired."""
        sessions = state.backend.sessions
        try:
            found = sessions is not None and sessions.delete(valid_id(sid))
        except SessionError as exc:
            return _error(400, str(exc), param="session")
        if not found:
            return _error(404, f"session '{sid}' does not exist", param="session", code="session_not_found")
        return JSONResponse({"id": sid, "object": "session.deleted", "deleted": True})

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody, x_zoo_priority: PriorityHeader = None) -> Response:
        return await _serve(state, body, None, body.prompt, chat=False, priority=x_zoo_priority)

    return app


async def _manage_lora(state: ServingState, body: LoadLoraBody, *, load: bool) -> Response:
    """vLLM's runtime LoRA routes, restricted to adapters the index declares and the zoo verified."""
    if body.lora_path is not None:
        return _error(400, "lora_path: refused; adapters are loaded only from the zoo, by the id the index declares", param="lora_path")
    aid = body.lora_name.removeprefix(f"{state.tenant}:")
    adapters = state.backend.adapters
    if adapters is None or aid not in adapters.declared:
        declared = ", ".join(sorted(adapters.declared)) if adapters else "none"
        return _error(404, f"lora_name: '{body.lora_name}' is not an adapter declared for tenant '{state.tenant}' (declared: {declared})",
                      param="lora_name", code="model_not_found")  # fmt: skip
    action = state.backend.load_adapter if load else state.backend.unload_adapter
    try:
        await asyncio.wrap_future(state.scheduler.call(action, aid))  # between two generations
    except AdapterError as exc:
        return _error(400, str(exc), param="lora_name")
    finally:
        state.sync_metrics()
    return PlainTextResponse(f"Success: LoRA adapter '{aid}' {'added' if load else 'removed'} successfully.")


def _damaged(sid: str, exc: SessionDamaged) -> JSONResponse:
    """A damaged session file fails its own requests only, with a 4xx naming it (issue #17)."""
    where = f"{exc.pointer}: " if exc.pointer else ""
    return _error(422, f"session '{sid}' is damaged ({where}{exc.problem}); delete it (DELETE /v1/sessions/{sid}) or import a good copy",
                  param="session", code="session_damaged")  # fmt: skip


def _session_or_error(state: ServingState, sid: str) -> dict[str, Any] | JSONResponse:
    sessions = state.backend.sessions
    try:
        transcript = sessions.load(valid_id(sid)) if sessions is not None else None
    except SessionDamaged as exc:
        return _damaged(sid, exc)
    except SessionError as exc:
        return _error(400, str(exc), param="session")
    if transcript is None:
        return _error(404, f"session '{sid}' does not exist", param="session", code="session_not_found")
    return transcript.document()


def _session_turn(state: ServingState, body: _Body, messages: list[dict[str, str]], max_tokens: int, route: str | None = None,
                  fresh: SessionSummary | None = None) -> tuple[Turn, list[dict[str, str]]] | NeedSummary | JSONResponse:  # fmt: skip
    """The whole conversation for the prompt: the session's turns, oldest dropped when they no longer fit, then the new messages."""
    sessions = state.backend.sessions if route is None else state.route_sessions.get(route)
    sid = getattr(body, "session", None)
    if route is not None and sessions is None:
        return _error(400, f"session: route '{route[:64]}' has no sessions here", param="session")
    if sessions is None or sid is None:
        return _error(400, "session: sessions are not available here", param="session")
    try:
        transcript = sessions.load(valid_id(sid))
    except SessionDamaged as exc:
        return _damaged(sid, exc)
    except SessionError as exc:
        return _error(400, str(exc), param="session")
    turns = transcript.turns if transcript is not None else []
    # The model's own context bounds the prompt too: a session on a small model leaves turns out, it does not fail.
    budget = min(state.max_prompt_tokens, state.backend.context_length() or state.max_prompt_tokens) - max_tokens
    if route is not None:
        return _route_turn(state, sessions, sid, transcript, messages, budget, fresh)
    dropped, ids = state.backend.session_prompt(turns, messages, budget)
    turn = Turn(sid, messages, dropped, history=turns[dropped:], cache="none" if not turns else "pending", prompt_ids=ids)
    return turn, Sessions.messages(transcript, dropped) + messages


def _route_turn(state: ServingState, sessions: Sessions, sid: str, transcript: SessionFile | None, messages: list[dict[str, str]],
                budget: int, fresh: SessionSummary | None) -> tuple[Turn, list[dict[str, str]]] | NeedSummary:  # fmt: skip
    """A route session's prompt on this tenant's model (issue #21): every turn, in this model's
    template; when they do not fit, the oldest are replaced by the route's summary of them
    (reused while it covers enough, made anew when more must go) or by a marker."""
    turns = transcript.turns if transcript is not None else []
    dropped, ids = state.backend.session_prompt(turns, messages, budget, native=sessions.native)
    turn = Turn(sid, messages, 0, cache="none" if not turns else "pending", store=sessions)
    preface: list[dict[str, str]] = []
    if dropped:
        reserve = min(256, budget // 4)  # room for the summary or the marker in front
        dropped, _ = state.backend.session_prompt(turns, messages, budget - reserve, native=sessions.native)
        latest = transcript.summaries[-1] if transcript is not None and transcript.summaries else None
        summarizer = state.summarizers.get(sessions.route or "")
        if latest is not None and latest.covers >= dropped:
            dropped, turn.summary, preface = latest.covers, "reused", [summary_message(latest)]
        elif fresh is not None and fresh.covers >= dropped and fresh.text:
            # At most the room reserved for it, in this model's tokens (the summarizer counts in its own).
            fresh = fresh.model_copy(update={"text": state.backend.truncate(fresh.text, reserve * 3 // 4)})
            dropped, turn.new_summary, turn.summary, preface = fresh.covers, fresh, "new", [summary_message(fresh)]
        elif summarizer is not None and fresh is None:
            return NeedSummary(dropped, condensed(latest, turns[latest.covers if latest else 0 : dropped]), max(16, reserve // 2))
        if not preface:
            turn.summary, preface = "marker", [marker_message(dropped)]
        more, ids = state.backend.session_prompt(turns[dropped:], messages, budget, native=sessions.native, preface=preface)
        if more:  # the summary itself took more room than reserved: later turns go too, without a summary
            ids = state.backend.session_prompt(turns[dropped + more :], messages, budget, native=sessions.native, preface=preface)[1]
            dropped += more
    turn.dropped_turns, turn.history, turn.prompt_ids = dropped, turns[dropped:], ids
    return turn, preface + Sessions.messages(transcript, dropped) + messages


def _adapter_for(state: ServingState, model: str) -> str | None | JSONResponse:
    """The `model` field: '<tenant>' is the base model, '<tenant>:<adapter>' an adapter, '<tenant>:auto' a choice."""
    if model in (state.tenant, state.model):
        return None
    tenant, sep, aid = model.partition(":")
    adapters = state.backend.adapters
    if sep and tenant == state.tenant:
        if aid == "auto" and state.backend.selector is not None:
            return AUTO
        if adapters is not None and aid in adapters.declared:
            if aid in adapters.refused:
                return _error(400, f"model: adapter refused: {adapters.refused[aid]}", param="model", code="adapter_refused")
            return aid
    return _error(404, f"model '{model}' is not served here (serving '{state.tenant}')", param="model", code="model_not_found")


async def _summarize(state: ServingState, route: str, need: NeedSummary) -> SessionSummary:
    """The route's summarizer's summary; one with no text (then: a marker) when it cannot answer."""
    summarizer = state.summarizers[route]
    try:
        text, model = await summarizer.summarize(need.messages, need.max_tokens)
    except SummaryFailed as exc:
        log.warning("route %s: %s; the first %d turns of the session are left out instead", route, exc, need.covers)
        text, model = "", summarizer.tenant
    return SessionSummary(covers=need.covers, text=text, model=model, time=now())


async def _serve(state: ServingState, body: _Body, messages: list[dict[str, str]] | None, prompt: str | None, *, chat: bool,
                 priority: str | None = None, route: str | None = None) -> Response:  # fmt: skip
    adapter = _adapter_for(state, body.model)
    if isinstance(adapter, JSONResponse):
        return adapter
    if body.max_tokens is not None and body.max_tokens > state.max_tokens_limit:
        return _error(400, f"max_tokens: at most {state.max_tokens_limit}", param="max_tokens")
    try:
        level = parse_priority(priority, body.priority, state.priority)
    except BadPriority as exc:
        return _error(400, str(exc), param=exc.param)
    if state.waiting + state.running + state.preparing >= state.max_batch + state.max_queue:
        # The batch is full and so is the queue behind it.
        return _error(429, f"busy ({state.running} running, {state.max_queue} waiting); retry", headers={"Retry-After": "1"})
    # Reading a session and tokenizing a long prompt take real time: never on the event loop,
    # which must keep answering pings (a blocked loop gets the worker killed). Requests being
    # prepared count against the queue, so that a burst cannot pass the check all at once.
    fresh: SessionSummary | None = None
    while True:
        state.preparing += 1
        try:
            request = await asyncio.get_running_loop().run_in_executor(state.preparer, _prepare, state, body, messages, prompt, adapter, chat,
                                                                       level, route, fresh)  # fmt: skip
        finally:
            state.preparing -= 1
        if not isinstance(request, NeedSummary):
            break
        fresh = await _summarize(state, route or "", request)  # then prepared again, with the summary
    if isinstance(request, JSONResponse):
        return request
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_sse(_pieces(state, request), rid, state, chat, request, usage), media_type="text/event-stream")
    return _Deferred(state, request, rid, chat)


def _prepare(state: ServingState, body: _Body, messages: list[dict[str, str]] | None, prompt: str | None, adapter: str | None,
             chat: bool, priority: int = 0, route: str | None = None, fresh: SessionSummary | None = None) -> GenRequest | NeedSummary | JSONResponse:  # fmt: skip
    """The generation request, its session turn built and its prompt counted (on the preparing thread)."""
    d = state.defaults
    turn = None
    if getattr(body, "session", None) is not None and messages is not None:
        made = _session_turn(state, body, messages, body.max_tokens or d["max_tokens"], route, fresh)
        if isinstance(made, JSONResponse | NeedSummary):
            return made
        turn, messages = made
    request = GenRequest(
        messages, prompt, body.max_tokens or d["max_tokens"],
        d["temperature"] if body.temperature is None else body.temperature,
        body.top_p if body.top_p is not None else d["top_p"], d.get("top_k", 0),
        body.seed if body.seed is not None else d.get("seed"), body.ignore_eos, adapter, turn, body.stops(), priority=priority,
    )  # fmt: skip
    prompt_tokens = state.backend.count_tokens(request)
    field_name = "messages" if chat else "prompt"
    if prompt_tokens == 0:
        return _error(400, f"{field_name}: encodes to no tokens", param=field_name)
    if prompt_tokens > state.max_prompt_tokens:
        return _error(400, f"{field_name}: {prompt_tokens} tokens, at most {state.max_prompt_tokens}", param=field_name)
    context = state.backend.context_length()
    if context is not None and prompt_tokens + request.max_tokens > context:
        if prompt_tokens >= context:
            return _error(400, f"{field_name}: {prompt_tokens} tokens do not fit the model's context of {context}", param=field_name)
        return _error(400, f"max_tokens: {request.max_tokens} with a prompt of {prompt_tokens} tokens passes the model's context of {context}; "
                           f"at most {context - prompt_tokens}", param="max_tokens")  # fmt: skip
    return request


class _Deferred(Response):
    """A non-streaming answer, computed when the response is sent (so the handler stays async)."""

    def __init__(self, state: ServingState, request: GenRequest, rid: str, chat: bool) -> None:
        super().__init__(media_type="application/json")
        self.args = (state, request, rid, chat)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        state, request, rid, chat = self.args
        text, result = "", Generated()

        async def generate() -> None:
            nonlocal text, result
            async for piece in _pieces(state, request, stream=False):
                if isinstance(piece, Generated):
                    result = piece
                else:
                    text += piece

        # As a StreamingResponse does: a client that goes away cancels its generation
        # (closing _pieces sets its cancel event), instead of keeping the model busy to the end.
        generating, gone = asyncio.ensure_future(generate()), asyncio.ensure_future(_disconnected(receive))
        await asyncio.wait({generating, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not generating.done():
            generating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await generating
            return
        gone.cancel()
        if (failed := generating.exception()) is not None:
            if not isinstance(failed, Exception):
                raise failed
            status, error = _failure(failed)
            await JSONResponse({"error": error}, status_code=status)(scope, receive, send)
            return
        choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        document = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                    "model": state.tenant, "system_fingerprint": f"{state.model}@{state.version}", "choices": [choice], "usage": _usage(result),
                    **_x_zoo(request, result)}  # fmt: skip
        await JSONResponse(document)(scope, receive, send)


def _failure(exc: Exception) -> tuple[int, dict[str, Any]]:
    """A generation that failed, as an OpenAI error: the request's fault (an adapter that cannot
    load, a damaged session) or ours (logged with its traceback: a bug or a broken model)."""
    if isinstance(exc, (AdapterError, SessionError)):
        param = "model" if isinstance(exc, AdapterError) else "session"
        return 400, {"message": " ".join(str(exc).split())[:400], "type": "invalid_request_error", "param": param, "code": None}
    log.error("generation failed: %s", exc, exc_info=exc)
    message = " ".join(f"generation failed: {type(exc).__name__}: {exc}".split())[:400]
    return 500, {"message": message, "type": "server_error", "param": None, "code": "generation_failed"}


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _pieces(state: ServingState, request: GenRequest, stream: bool = True) -> AsyncIterator[str | Generated]:
    """Text pieces, then the Generated summary. The generation runs on the scheduler's thread
    (the batching engine); this coroutine only awaits, so the event loop keeps answering."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue[Any]()
    cancel = threading.Event()
    m, queued = state.metrics, time.monotonic()
    state.scheduler.submit(request, Generated(), cancel, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item), stream)
    first = last = None
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            now = time.monotonic()
            if isinstance(item, Generated):
                m.queue.observe(item.queue_seconds)
                m.e2e.observe(now - queued)
                m.prompt_tokens.inc(item.prompt_tokens)
                m.generation_tokens.inc(item.completion_tokens)
                m.requests.labels(item.finish_reason).inc()
                if request.adapter == AUTO:
                    labels = [f"{a['id']}@{a['version']}" for a in item.adapters] or [item.adapter or "base"]
                    for label in labels:
                        m.lora_selections.labels(label).inc()
                    if item.combine is not None:
                        m.lora_compositions.labels(item.combine, ",".join(sorted(labels))).inc()
                state.sync_metrics()
                with state.lock:
                    state.served += 1
                    state.tokens += item.completion_tokens
                yield item
                return
            if first is None:
                first = now
                m.ttft.observe(now - queued)
            else:
                m.itl.observe(now - (last or now))
            last = now
            yield item
    finally:
        cancel.set()  # a client that went away stops its generation


def _x_zoo(request: GenRequest, result: Generated) -> dict[str, Any]:
    """Our extension field: which adapter answered (for '<tenant>:auto', how similar it was; a
    composition also lists its adapters and how they were combined), and for a session how its
    turn was continued."""
    extra: dict[str, Any] = {}
    if request.adapter is not None:
        extra.update(adapter=result.adapter, **({"similarity": round(result.similarity, 4)} if result.similarity is not None else {}))
        if result.combine is not None:
            extra.update(adapters=result.adapters, combine=result.combine)
    if (turn := request.session) is not None:
        extra["session"] = {"id": turn.id, "cache": turn.cache, "cached_tokens": turn.cached_tokens, "dropped_turns": turn.dropped_turns}
        if turn.store is not None:  # a route session: how the turns that do not fit were replaced
            extra["session"].update(route=turn.store.route, summary=turn.summary)
    return {"x_zoo": extra} if extra else {}


def _usage(result: Generated) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens, "total_tokens": result.prompt_tokens + result.completion_tokens}


async def _sse(pieces: AsyncIterator[str | Generated], rid: str, state: ServingState, chat: bool, request: GenRequest,
               usage: bool = False) -> AsyncIterator[str]:  # fmt: skip
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"
    fingerprint = f"{state.model}@{state.version}"  # which version answered: OpenAI's field for it

    def chunk(delta: str | None, finish: str | None, extra: dict[str, Any] | None = None) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat:
            choice["delta"] = {"content": delta} if delta is not None else {}
        else:
            choice["text"] = delta or ""
        return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": state.tenant,
                                      "system_fingerprint": fingerprint, "choices": [choice], **(extra or {})}) + "\n\n"

    if chat:
        yield "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": state.tenant, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}) + "\n\n"
    try:
        async for piece in pieces:
            if isinstance(piece, Generated):
                yield chunk(None, piece.finish_reason, _x_zoo(request, piece))
                if usage:
                    yield "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": state.tenant, "system_fingerprint": fingerprint,
                                                 "choices": [], "usage": _usage(piece)}) + "\n\n"  # fmt: skip
            elif piece:
                yield chunk(piece, None)
    except Exception as exc:  # noqa: BLE001 - the status line is sent: the failure goes into the stream
        yield "data: " + json.dumps({"error": _failure(exc)[1]}) + "\n\n"  # as OpenAI and vLLM do, not a silent close
    yield "data: [DONE]\n\n"
