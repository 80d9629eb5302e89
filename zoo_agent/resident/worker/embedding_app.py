"""The HTTP API of an embedding tenant's worker (issue #36): plain ASGI over ``wire/``'s primitives, behind
the same ``Gate`` (body limit, bearer token) as a generating worker.

Routes: ``POST /v1/embeddings`` (OpenAI's request and answer, ``wire/embeddings``), ``GET /v1/models``,
``GET /health`` and ``GET /metrics`` (the generating worker's names where they mean the same; and
``zoo:embedding_batch_inputs``). A request is read with the one bounded JSON reader, checked, given its
priority and a place (``max_batch + max_queue`` requests at once, as the router counts them; a 429
beyond), and waits for its vectors while its client is watched: a client that leaves cancels what is
left of its request. The answer (up to ``MAX_INPUTS`` vectors) is written on a thread, off the loop
that answers the supervisor's pings.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import generate_latest

from zoo_agent.jsonbound import JSONRefused, loads
from zoo_agent.resident.wire.embeddings import PATH, EmbeddingRequest, answer, parse_embeddings
from zoo_agent.resident.wire.gate import Gate
from zoo_agent.resident.wire.headers import PRIORITY
from zoo_agent.resident.wire.http import MAX_BODY, ApiError, App, Receive, Scope, Send, disconnected, header
from zoo_agent.resident.wire.priority import BadPriority, parse_priority
from zoo_agent.resident.worker.embeddings import Embedded, EmbeddingEngine

__all__ = ["EmbeddingState", "create_embedding_app"]


@dataclass
class EmbeddingState:
    tenant: str
    model: str
    version: str
    engine: EmbeddingEngine
    max_batch: int = 16
    max_queue: int = 16
    priority: int = 0  # the tenant's default class
    api_key: str | None = field(default=None, repr=False)
    draining: bool = False
    served: int = 0

    def sync_metrics(self) -> None:
        m, engine = self.engine.metrics, self.engine
        m.running.set(engine.running)
        m.waiting.set(engine.waiting)
        for name, count in engine.waiting_by_class().items():
            m.waiting_by_priority.labels(name).set(count)


def create_embedding_app(state: EmbeddingState) -> App:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        close = [(b"connection", b"close")] if state.draining else []  # clients move to the new worker, no reset
        try:
            status, body, content = await _route(state, scope, receive)
        except ApiError as exc:
            status, body, content = exc.status, exc.body(), b"application/json"
        if status:  # 0: the client left; nothing to answer
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", content), (b"content-length", str(len(body)).encode()), *close]})  # fmt: skip
            await send({"type": "http.response.body", "body": body, "more_body": False})

    return Gate(app, max_body=MAX_BODY, api_key=state.api_key)


async def _route(state: EmbeddingState, scope: Scope, receive: Receive) -> tuple[int, bytes, bytes]:
    """(status, body, content type) of a request; ``ApiError`` for every refusal."""
    method, path, plain = scope["method"], scope["path"], b"application/json"
    if path == "/health" and method == "GET":
        health = {"state": "draining" if state.draining else "ready", "tenant": state.tenant, "model": state.model, "version": state.version}
        return 503 if state.draining else 200, json.dumps(health).encode(), plain
    if path == "/metrics" and method == "GET":
        state.sync_metrics()
        return 200, generate_latest(state.engine.metrics.registry), b"text/plain; version=0.0.4"
    if path == "/v1/models" and method == "GET":
        card = {"id": state.tenant, "object": "model", "created": 0, "owned_by": "model-zoo", "root": f"{state.model}@{state.version}", "parent": None}
        return 200, json.dumps({"object": "list", "data": [card]}).encode(), plain
    if path == PATH and method == "POST":
        return await _embed(state, scope, receive)
    if path in (PATH, "/health", "/metrics", "/v1/models"):
        raise ApiError(405, f"method: {path} takes {'POST' if path == PATH else 'GET'}, not {method[:20]!r}", "method", "method_not_allowed")
    raise ApiError(404, f"{path[:100]}: not here; tenant '{state.tenant}' embeds (POST {PATH})")


async def _embed(state: EmbeddingState, scope: Scope, receive: Receive) -> tuple[int, bytes, bytes]:
    started = time.monotonic()
    request, priority = _read(state, scope, await _body(receive))
    engine = state.engine
    if engine.jobs() >= state.max_batch + state.max_queue:
        raise ApiError(429, f"busy ({engine.running} running, {engine.waiting} waiting); retry", code="queue_full")
    job = engine.submit(request.inputs, priority)
    gone: asyncio.Future[None] = asyncio.ensure_future(disconnected(receive))
    waiting: asyncio.Future[Any] = asyncio.wrap_future(job.future)
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            engine.cancel(job)
            return 0, b"", b""
        result: Embedded = waiting.result()  # an ApiError (a text too long) is the answer
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model failed: a 500 that says so, the worker serves on
        raise ApiError(500, f"embedding failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    finally:
        gone.cancel()
    body = await asyncio.to_thread(answer, request.model, result.rows, result.prompt_tokens, as_base64=request.base64)
    state.served += 1
    engine.metrics.requests.labels("stop").inc()
    engine.metrics.e2e.observe(time.monotonic() - started)
    return 200, body, b"application/json"


async def _body(receive: Receive) -> bytes:
    """The body the Gate read (and bounded): one message."""
    message = await receive()
    return bytes(message.get("body", b"")) if message["type"] == "http.request" else b""


def _read(state: EmbeddingState, scope: Scope, body: bytes) -> tuple[EmbeddingRequest, int]:
    """The request and its priority, or an ``ApiError`` naming the field."""
    try:
        document = loads(body)
    except JSONRefused as exc:
        raise ApiError(400, f"body: {exc}", "body") from None
    if not isinstance(document, dict):
        raise ApiError(400, "body: must be a JSON object", "body")
    request = parse_embeddings(document)
    if request.model != state.tenant:
        raise ApiError(404, f"model: {request.model[:100]!r} is not served here (this worker embeds for '{state.tenant}')", "model", "model_not_found")
    dimension = state.engine.embedder.dimension
    if request.dimensions is not None and request.dimensions != dimension:
        raise ApiError(400, f"dimensions: this model gives {dimension}-dimensional vectors and is not trained to give shorter ones", "dimensions")
    try:
        priority = parse_priority(header(scope, PRIORITY), document.get("priority"), state.priority)
    except BadPriority as exc:
        raise ApiError(400, str(exc), exc.param) from None
    return request, priority
