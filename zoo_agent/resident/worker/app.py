"""The OpenAI-compatible HTTP API of a worker (issue #5): FastAPI, served by uvicorn.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
``stream: true`` as server-sent events ending in ``data: [DONE]``), GET /health and
GET /metrics (Prometheus; names follow vLLM's, prefixed ``zoo:``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from zoo_agent.resident.sessions.store import SessionError, valid_id
from zoo_agent.resident.sessions.summaries import NeedSummary
from zoo_agent.resident.sessions.transcript import SessionSummary
from zoo_agent.resident.sessions.turns import Refusal, session_document, summarize
from zoo_agent.resident.wire.gate import Gate
from zoo_agent.resident.wire.priority import BadPriority, parse_priority
from zoo_agent.resident.worker.backend import AdapterError
from zoo_agent.resident.worker.bodies import Body, BoundedRoute, ChatBody, CompletionBody, LoadLoraBody, PriorityHeader, RouteHeader
from zoo_agent.resident.worker.daemon import unavailable
from zoo_agent.resident.worker.prepare import adapter_for, prepare
from zoo_agent.resident.worker.responses import Deferred, error, pieces, refused, sse
from zoo_agent.resident.worker.state import ServingState

__all__ = ["ServingState", "create_app"]

MAX_BODY = 1 << 20


def create_app(state: ServingState) -> FastAPI:
    app = FastAPI(title="model-zoo resident", version="1")
    app.router.route_class = BoundedRoute  # before the first route
    _errors(app)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        if state.draining:
            response.headers["Connection"] = "close"  # clients move to the new worker, no reset
        return response

    app.add_middleware(Gate, max_body=MAX_BODY, api_key=state.api_key)  # outermost: auth and body limit before anything reads
    _status_routes(app, state)
    _serving_routes(app, state)
    return app


def _errors(app: FastAPI) -> None:
    """What FastAPI and Starlette answer themselves, in OpenAI's error shape."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        where, message = _first_problem(exc.errors())
        if not where:  # the body as a whole: not an object, or not read as JSON at all (FastAPI's strict Content-Type)
            return error(400, "body: must be a JSON object, sent with Content-Type: application/json", param="body")
        return error(400, f"{where}: {message}", param=where)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """OpenAI's error shape for what Starlette answers itself (a body that is not JSON or not UTF-8, no such route)."""
        return error(exc.status_code, f"body: {exc.detail}" if exc.status_code == 400 else str(exc.detail),
                     param="body" if exc.status_code == 400 else None, headers=getattr(exc, "headers", None))  # fmt: skip


def _status_routes(app: FastAPI, state: ServingState) -> None:
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


def _serving_routes(app: FastAPI, state: ServingState) -> None:
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
        found = session_document(state.backend.sessions, sid)
        return refused(found) if isinstance(found, Refusal) else JSONResponse(found)

    @app.delete("/v1/sessions/{sid}", response_model=None)
    async def delete_session(sid: str) -> Response:
        """Deletes a damaged session too: that is how one is repaired."""
        sessions = state.backend.sessions
        try:
            found = sessions is not None and sessions.delete(valid_id(sid))
        except SessionError as exc:
            return error(400, str(exc), param="session")
        if not found:
            return error(404, f"session '{sid}' does not exist", param="session", code="session_not_found")
        return JSONResponse({"id": sid, "object": "session.deleted", "deleted": True})

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody, x_zoo_priority: PriorityHeader = None) -> Response:
        return await _serve(state, body, None, body.prompt, chat=False, priority=x_zoo_priority)


async def _manage_lora(state: ServingState, body: LoadLoraBody, *, load: bool) -> Response:
    """vLLM's runtime LoRA routes, restricted to adapters the index declares and the zoo verified."""
    if body.lora_path is not None:
        return error(400, "lora_path: refused; adapters are loaded only from the zoo, by the id the index declares", param="lora_path")
    aid = body.lora_name.removeprefix(f"{state.tenant}:")
    adapters = state.backend.adapters
    if adapters is None or aid not in adapters.declared:
        declared = ", ".join(sorted(adapters.declared)) if adapters else "none"
        return error(404, f"lora_name: '{body.lora_name}' is not an adapter declared for tenant '{state.tenant}' (declared: {declared})",
                     param="lora_name", code="model_not_found")  # fmt: skip
    action = state.backend.load_adapter if load else state.backend.unload_adapter
    try:
        await asyncio.wrap_future(state.scheduler.call(action, aid))  # between two generations
    except AdapterError as exc:
        return error(400, str(exc), param="lora_name")
    finally:
        state.sync_metrics()
    return PlainTextResponse(f"Success: LoRA adapter '{aid}' {'added' if load else 'removed'} successfully.")


async def _serve(state: ServingState, body: Body, messages: list[dict[str, str]] | None, prompt: str | None, *, chat: bool,
                 priority: str | None = None, route: str | None = None) -> Response:  # fmt: skip
    adapter = adapter_for(state, body.model, body.x_zoo)
    if isinstance(adapter, Refusal):
        return refused(adapter)
    if (away := unavailable(state.backend)) is not None:  # its Ollama daemon is away (issue #35): a 503 at once, not a try
        return error(503, str(away), code="model_unavailable", headers={"Retry-After": str(away.retry_after)})
    if body.max_tokens is not None and body.max_tokens >= state.max_context:  # the prompt takes one token at least: no tokenizing needed
        return error(400, f"max_tokens: {body.max_tokens} passes the context of {state.max_context} tokens (resources.max_context), "
                          f"which holds the prompt too; at most {state.max_context - 1}", param="max_tokens", code="context_length_exceeded")  # fmt: skip
    try:
        level = parse_priority(priority, body.priority, state.priority)
    except BadPriority as exc:
        return error(400, str(exc), param=exc.param)
    if state.waiting + state.running + state.preparing >= state.max_batch + state.max_queue:
        # The batch is full and so is the queue behind it.
        return error(429, f"busy ({state.running} running, {state.max_queue} waiting); retry", headers={"Retry-After": "1"})
    # Reading a session and tokenizing a long prompt take real time: never on the event loop,
    # which must keep answering pings (a blocked loop gets the worker killed). Requests being
    # prepared count against the queue, so that a burst cannot pass the check all at once.
    fresh: SessionSummary | None = None
    while True:
        state.preparing += 1
        try:
            request = await asyncio.get_running_loop().run_in_executor(state.preparer, prepare, state, body, messages, prompt, adapter.adapter, chat,
                                                                       level, route, fresh)  # fmt: skip
        finally:
            state.preparing -= 1
        if not isinstance(request, NeedSummary):
            break
        fresh = await summarize(state.summarizers, route or "", request)  # then prepared again, with the summary
    if isinstance(request, Refusal):
        return refused(request)
    request = replace(request, scaled=adapter.scaled, exclude=adapter.exclude)  # the set and what none may use (issue #36)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(sse(pieces(state, request), rid, state, chat, request, usage), media_type="text/event-stream")
    return Deferred(state, request, rid, chat)


def _first_problem(errors: Sequence[Any]) -> tuple[str, str]:
    """The field and the message of a body's first problem, in the client's words. pydantic names
    the branch of a union it tried (``function-after[functools.partial(<function … at 0x…>)]``):
    that is no field, and its address is ours; of the branches' errors at one field, the one
    that is not only "a valid string" says what is wrong (``stop`` of five items, issue #31)."""

    def field(loc: Sequence[Any]) -> str:
        return ".".join(str(p) for p in loc if p != "body" and (isinstance(p, int) or str(p).isidentifier()))

    first = errors[0]
    where = field(first["loc"])
    same = [e for e in errors if field(e["loc"]) == where]
    chosen = next((e for e in same if not str(e.get("type", "")).endswith("_type")), first)
    return where, str(chosen["msg"])
