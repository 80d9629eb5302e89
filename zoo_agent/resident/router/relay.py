"""One exchange with a server we do not trust to speak to our clients: a peer host (issues #22, #31)
or a remote tenant's server (issue #36). Its answer is relayed only as ``peer_answer`` allows.

The head is ours, each document is read by the bounded reader and written by us, the body is
decoded in bounded steps (no ``Content-Encoding`` is passed on), no redirect is followed (httpx
follows none unless asked; ``peer_answer.judge`` refuses every 3xx). Before anything reached the
client, a failure, an answer not to relay or no first token within ``wait`` is a ``Fallback``
(the next peer's, or the route's next candidate's turn); after it, the stream ends with an error
event naming ``who`` answered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx

from zoo_agent.resident.router.peer_answer import MAX_ERROR, Events, Refused, error_message, head, judge, whole
from zoo_agent.resident.router.upstream import MAX_ANSWER, Fallback, attempt, decoded, read_body, read_some
from zoo_agent.resident.wire.http import Send, respond, stream_error

__all__ = ["relay", "relay_events"]


async def relay(client: httpx.AsyncClient, target: str, headers: list[tuple[bytes, bytes]], body: bytes, send: Send, gone: asyncio.Future[None],
            stream: bool, wait: float, x_zoo: dict[str, Any], committed_to: Callable[[], None], who: str,
            total: float | None = None) -> int:  # fmt: skip
    """POST ``body`` to ``target`` and relay the answer (its status code); ``wait``: the most the
    head and, streamed, the first token may take (a whole answer: all of it); ``total``: the most a
    streamed answer may take in all (None: no bound), past which it ends with an error event."""
    deadline = time.monotonic() + wait
    response = await attempt(client, target, headers, body, gone, wait)
    if response is None:
        return 499
    try:
        try:
            kind = judge(response.status_code, response.headers.get("content-type", ""), stream)
        except Refused as exc:
            said = error_message(await read_some(response, MAX_ERROR)) if response.status_code >= 400 else ""
            raise Fallback(str(exc) + (f": {said}" if said else ""), "failed") from None
        if kind == "error" or not stream:
            try:
                data = await asyncio.wait_for(read_body(response, MAX_ANSWER), max(1.0, deadline - time.monotonic()))
                whole_answer = whole(response.status_code, data, x_zoo)
            except TimeoutError:
                raise Fallback(f"its answer did not arrive within {wait:g}s", "first_token_timeout") from None
            except Refused as exc:
                raise Fallback(str(exc), "failed") from None
            if kind == "answer":
                committed_to()
            await respond(send, response.status_code, whole_answer)
            return response.status_code
        ends = time.monotonic() + total if total is not None else None
        return await relay_events(response, send, gone, Events(x_zoo, MAX_ANSWER), deadline, wait, committed_to, who, ends)
    finally:
        await response.aclose()


async def relay_events(response: httpx.Response, send: Send, gone: asyncio.Future[None], events: Events, deadline: float, wait: float,
                       committed_to: Callable[[], None], who: str, ends: float | None = None) -> int:  # fmt: skip
    """An event stream, each event checked (``Events``) before it is sent; see ``relay``. ``ends``:
    when (monotonic) the answer must have ended; None: it may take as long as it streams."""
    started = False  # our head is out: from here on a failure ends the stream, never the next candidate
    reading = decoded(response).__aiter__()  # decoded, in bounded steps: a compressing proxy in front changes nothing
    while True:
        chunk: asyncio.Future[bytes] = asyncio.ensure_future(reading.__anext__())
        pair: set[asyncio.Future[Any]] = {chunk, gone}
        limit = deadline if not started else ends
        done, _ = await asyncio.wait(pair, timeout=None if limit is None else max(0.0, limit - time.monotonic()), return_when=asyncio.FIRST_COMPLETED)
        if gone in done:
            chunk.cancel()
            return 499
        if chunk not in done:  # no first token in time, or an answer that goes on past ``ends`` (closing cancels its generation)
            chunk.cancel()
            if not started:
                raise Fallback(f"no first token within {wait:g}s", "first_token_timeout")
            await stream_error(send, 504, f"{who}: the answer went on longer than the tenant's timeout", events.x_zoo)
            return 504
        try:
            out = events.feed(chunk.result())
        except StopAsyncIteration:
            break
        except (httpx.HTTPError, OSError, Refused, Fallback) as exc:
            if isinstance(exc, Fallback) and not started:
                raise
            why = str(exc) if isinstance(exc, (Refused, Fallback)) else f"the answer broke off ({type(exc).__name__})"
            if not started:
                raise Fallback(why, "failed" if isinstance(exc, Refused) else "crashed") from None
            for event in exc.ready if isinstance(exc, Refused) else []:  # checked before the bad one
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await stream_error(send, 502, f"{who}: {why}", events.x_zoo)
            return 502
        if events.committed and not started:
            committed_to()
            await send({"type": "http.response.start", "status": 200, "headers": head(True)})
            started = True
        for event in out:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        if events.finished:
            break  # [DONE]: whatever the server sends after it is not the answer's
    try:
        events.end()
    except Refused as exc:
        if not started:
            raise Fallback(str(exc), "failed") from None
        await stream_error(send, 502, f"{who}: {exc}", events.x_zoo)
        return 502
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return 200
