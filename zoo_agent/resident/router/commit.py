"""An exchange another candidate may still take over until its first token (issues #21, #22, #32).

A route's next tenant, or a tenant's next peer, may answer instead while nothing was sent to the
client: ``pipe_committed`` holds what arrives before the first token (bounded), commits at it,
and says who answered (``x_zoo``) on the answer's last chunk or its error.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx

from zoo_agent.jsonbound import loads
from zoo_agent.resident.router.upstream import HOP_BACK, MAX_ANSWER, Fallback, attempt, bounded, message_of, read_body
from zoo_agent.resident.wire.http import Send, stream_error

__all__ = ["pipe_committed"]


async def pipe_committed(client: httpx.AsyncClient, target: str, headers: list[tuple[bytes, bytes]], body: bytes, send: Send,
                          gone: asyncio.Future[None], stream: bool, ttft: float | None, x_zoo: dict[str, Any],
                          committed_to: Callable[[], None], passes: frozenset[int] = frozenset({429})) -> int:  # fmt: skip
    """One exchange that another candidate (a route's next tenant, the next peer) may still take
    over: committed to the client only at its first token. ``x_zoo`` goes into the answer
    (on its last chunk): who answered and why. ``Fallback`` before the first token: a
    failure, a status in ``passes`` or any 5xx, or no first token within ``ttft``."""
    deadline = time.monotonic() + ttft if ttft else None
    response = await attempt(client, target, headers, body, gone, ttft)
    if response is None:
        return 499
    try:
        if response.status_code >= 500 or response.status_code in passes:
            error = await read_body(response, MAX_ANSWER)
            raise Fallback(f"answered {response.status_code}: {await bounded(len(error), message_of, error)}", "failed")
        out = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BACK | {b"content-length"}]
        if not stream or response.status_code != 200:
            return await _whole(response, send, out, x_zoo, committed_to)
        commit = _Commit(send, out, x_zoo, committed_to)
        return await _events(response, gone, deadline, ttft, commit)
    finally:
        await response.aclose()


async def _whole(response: httpx.Response, send: Send, out: list[tuple[bytes, bytes]], x_zoo: dict[str, Any],
                 committed_to: Callable[[], None]) -> int:  # fmt: skip
    """A whole answer (not a stream, or an error), with ``x_zoo`` merged in; a 200 commits."""
    data = await read_body(response, MAX_ANSWER)
    try:  # an error answer says who gave it too (README: every answer)
        data = await bounded(len(data), _answer_with, data, x_zoo, response.status_code == 200)
    except ValueError as exc:
        raise Fallback(f"answered 200 with no JSON ({exc})", "failed") from None
    if response.status_code == 200:
        committed_to()
    await send({"type": "http.response.start", "status": response.status_code, "headers": [*out, (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data, "more_body": False})
    return response.status_code


async def _events(response: httpx.Response, gone: asyncio.Future[None], deadline: float | None, ttft: float | None, commit: _Commit) -> int:
    """A stream read chunk by chunk, the client watched between them, until it ends; ``Fallback`` before its first token."""
    reading = response.aiter_raw().__aiter__()
    while True:
        timeout = None if commit.committed or deadline is None else max(0.0, deadline - time.monotonic())
        chunk: asyncio.Future[bytes] = asyncio.ensure_future(reading.__anext__())
        pair: set[asyncio.Future[Any]] = {chunk, gone}
        done, _ = await asyncio.wait(pair, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if gone in done:
            chunk.cancel()
            return 499
        if chunk not in done:  # no first token in time: give it up (closing cancels its generation)
            chunk.cancel()
            raise Fallback(f"no first token within {ttft:g}s", "first_token_timeout")
        try:
            data = chunk.result()
        except StopAsyncIteration:
            break
        except (httpx.TransportError, OSError) as exc:
            if not commit.committed:
                raise Fallback(f"failed before the first token ({type(exc).__name__})", "crashed") from exc
            await stream_error(commit.send, 502, f"the answer failed midway: {type(exc).__name__}", commit.x_zoo)
            return 502
        if (failed := await commit.feed(data)) is not None:
            return failed
    if not commit.committed:
        raise Fallback("its answer ended before a first token", "failed")
    await commit.send({"type": "http.response.body", "body": bytes(commit.buffer.pending), "more_body": False})
    return 200


class _Commit:
    """A stream's events on their way to the client: what arrives before the first token is held, up to
    ``MAX_ANSWER`` bytes in all; the first token commits the answer and sends what was held."""

    def __init__(self, send: Send, out: list[tuple[bytes, bytes]], x_zoo: dict[str, Any], committed_to: Callable[[], None]) -> None:
        self.send, self.out, self.x_zoo, self.committed_to = send, out, x_zoo, committed_to
        self.committed, self.held, self.held_bytes, self.buffer = False, list[bytes](), 0, _Events()

    async def feed(self, data: bytes) -> int | None:
        """A chunk's complete events passed on (or held); 502 when an event passed ``MAX_ANSWER`` after the commit."""
        events = self.buffer.feed(data)
        size = len(self.buffer.pending) + (0 if self.committed else self.held_bytes + sum(map(len, events)))
        if size > MAX_ANSWER:  # no answer of ours: one event this large, or this much before a first token
            if not self.committed:
                raise Fallback(f"more than {MAX_ANSWER} bytes before a first token, or one event that large", "failed")
            await stream_error(self.send, 502, "the answer sent an oversized event", self.x_zoo)
            return 502
        for event in events:
            if not self.committed:
                self.held.append(event)
                self.held_bytes += len(event)
                if not await bounded(len(event), _first_token, event):
                    continue
                self.committed = True
                self.committed_to()
                await self.send({"type": "http.response.start", "status": 200, "headers": self.out})
                events_out, self.held = self.held, []
            else:
                events_out = [event]
            for e in events_out:
                await self.send({"type": "http.response.body", "body": await bounded(len(e), _with_x_zoo, e, self.x_zoo) + b"\n\n", "more_body": True})
        return None


class _Events:
    """An SSE answer's events from its chunks, each chunk searched for an event's end once: linear
    in the answer however it is cut (joining and splitting the whole buffer at every chunk was
    quadratic: a peer sending a large event a few bytes at a time held the router's loop)."""

    def __init__(self) -> None:
        self.pending = bytearray()  # the event under way

    def feed(self, data: bytes) -> list[bytes]:
        """The events ``data`` completes (without their blank-line ends)."""
        seen = len(self.pending)  # it holds no blank line: only where the new bytes begin can one start
        self.pending += data
        if self.pending.find(b"\n\n", max(0, seen - 1)) < 0:
            return []
        *events, rest = bytes(self.pending).split(b"\n\n")  # each byte split once: at the chunk that ends its event
        self.pending = bytearray(rest)
        return events


def _answer_with(data: bytes, x_zoo: dict[str, Any], required: bool) -> bytes:
    """A whole JSON answer with ``x_zoo`` merged into it; ``ValueError`` when it is no JSON and ``required``
    (a 200), else the bytes as they came (an error answer that is not ours to judge)."""
    try:
        document = loads(data)
    except ValueError:
        if required:
            raise
        return data
    if not isinstance(document, dict) and not required:
        return data
    return json.dumps(_merged(document, x_zoo)).encode()


def _first_token(event: bytes) -> bool:
    """An SSE event that commits the answer: text, the end, an error, or [DONE] (the role chunk does not)."""
    data = event.removeprefix(b"data: ").strip()
    if not event.startswith(b"data: ") or data == b"[DONE]":
        return data == b"[DONE]"
    try:
        document = loads(data)
    except ValueError:
        return True
    if not isinstance(document, dict) or "error" in document:
        return True  # not a chunk we know: it is the answer's, so it commits (never a second model's continuation)
    for choice in _choices(document):
        delta = choice.get("delta")
        if choice.get("finish_reason") or choice.get("text") or (isinstance(delta, dict) and delta.get("content")):
            return True
    return False


def _choices(document: dict[str, Any]) -> list[dict[str, Any]]:
    """A chunk's choices that are objects (a peer's answer is input like any other)."""
    choices = document.get("choices")
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


def _merged(document: Any, x_zoo: dict[str, Any]) -> Any:
    """``document`` with ``x_zoo`` added to its own (replaced when that is not an object)."""
    if isinstance(document, dict):
        own = document.get("x_zoo")
        document["x_zoo"] = {**(own if isinstance(own, dict) else {}), **x_zoo}
    return document


def _with_x_zoo(event: bytes, x_zoo: dict[str, Any]) -> bytes:
    """The last chunk (the one with a finish_reason, or an error event) says who answered (a route's tenant, a peer)."""
    if not event.startswith(b"data: {"):
        return event
    try:
        document = loads(event[6:])
    except ValueError:
        return event
    if not isinstance(document, dict) or not ("error" in document or any(c.get("finish_reason") for c in _choices(document))):
        return event
    return b"data: " + json.dumps(_merged(document, x_zoo)).encode()
