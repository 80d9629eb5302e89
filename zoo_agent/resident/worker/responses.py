"""What a worker answers (issue #5): OpenAI's error bodies, built in one place (``error_body``),
a completion as one JSON document or as server-sent events, and our ``x_zoo`` field (``wire/documents.AnswerZoo``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response

from zoo_agent.errors import OllamaDown
from zoo_agent.resident.engine.base import AUTO, Generated
from zoo_agent.resident.engine.base import Request as GenRequest
from zoo_agent.resident.sessions.store import SessionError
from zoo_agent.resident.sessions.turns import Refusal
from zoo_agent.resident.wire.documents import AnswerZoo, ComposedAdapter, SessionReport, dump
from zoo_agent.resident.wire.http import ApiError
from zoo_agent.resident.worker.backend import AdapterError
from zoo_agent.resident.worker.state import ServingState

__all__ = ["Deferred", "error", "error_body", "failure", "pieces", "refused", "sse"]

log = logging.getLogger("zoo_agent.resident")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: the one place a worker builds one, by the wire's one rule (``wire/http.py``)."""
    error: dict[str, Any] = ApiError(status, message, param, code).document()["error"]
    return error


def error(status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error_body(status, message, param, code)}, status_code=status, headers=headers)


def refused(refusal: Refusal) -> JSONResponse:
    return error(refusal.status, refusal.message, refusal.param, refusal.code)


class Deferred(Response):
    """A non-streaming answer, computed when the response is sent (so the handler stays async)."""

    def __init__(self, state: ServingState, request: GenRequest, rid: str, chat: bool) -> None:
        super().__init__(media_type="application/json")
        self.args = (state, request, rid, chat)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        state, request, rid, chat = self.args
        text, result = "", Generated()

        async def generate() -> None:
            nonlocal text, result
            async for piece in pieces(state, request, stream=False):
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
            status, error = failure(failed)
            after = getattr(failed, "retry_after", None)  # an Ollama daemon away: when to ask again
            await JSONResponse({"error": error}, status_code=status, headers={"Retry-After": str(after)} if after else None)(scope, receive, send)
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


def failure(exc: Exception) -> tuple[int, dict[str, Any]]:
    """A generation that failed, as an OpenAI error: the request's fault (an adapter that cannot
    load, a damaged session), an Ollama daemon away (503), or ours (logged with its traceback: a
    bug or a broken model)."""
    if isinstance(exc, (AdapterError, SessionError)):
        param = "model" if isinstance(exc, AdapterError) else "session"
        return 400, error_body(400, " ".join(str(exc).split())[:400], param)
    if isinstance(exc, OllamaDown):  # the tenant's daemon is away: not a bug, and not for long (issue #35)
        return 503, error_body(503, " ".join(str(exc).split())[:400], code="model_unavailable")
    log.error("generation failed: %s", exc, exc_info=exc)
    message = " ".join(f"generation failed: {type(exc).__name__}: {exc}".split())[:400]
    return 500, error_body(500, message, code="generation_failed")


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def pieces(state: ServingState, request: GenRequest, stream: bool = True) -> AsyncIterator[str | Generated]:
    """Text pieces, then the Generated summary. The generation runs on the scheduler's thread
    (the batching engine); this coroutine only awaits, so the event loop keeps answering."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue[Any]()
    cancel = threading.Event()
    m, queued = state.metrics, time.monotonic()
    def emit(item: Any) -> None:  # on the scheduler's thread
        loop.call_soon_threadsafe(queue.put_nowait, item)

    state.scheduler.submit(request, Generated(), cancel, emit, stream)
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
                labels = [f"{a['id']}@{a['version']}" for a in item.adapters] or [item.adapter or "base"]
                if request.adapter == AUTO:
                    for label in labels:
                        m.lora_selections.labels(label).inc()
                if item.combine is not None:  # '<tenant>:auto' composing, or a set the caller named (issue #36)
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
            extra.update(adapters=[ComposedAdapter(**a) for a in result.adapters], combine=result.combine)
    if (turn := request.session) is not None:
        route = {"route": turn.store.route, "summary": turn.summary} if turn.store is not None else {}  # a route session: how turns that do not fit were replaced
        extra["session"] = SessionReport(id=turn.id, cache=turn.cache, cached_tokens=turn.cached_tokens, dropped_turns=turn.dropped_turns, **route)
    return {"x_zoo": dump(AnswerZoo(**extra))} if extra else {}


def _usage(result: Generated) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens, "total_tokens": result.prompt_tokens + result.completion_tokens}


async def sse(pieces: AsyncIterator[str | Generated], rid: str, state: ServingState, chat: bool, request: GenRequest,
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
        yield "data: " + json.dumps({"error": failure(exc)[1]}) + "\n\n"  # as OpenAI and vLLM do, not a silent close
    yield "data: [DONE]\n\n"
