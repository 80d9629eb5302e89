"""A route session that no longer fits the model answering it (issue #21): its oldest turns
are summarized by the route's summarizer tenant, or left out with a marker.

The summary is written into the session (``SessionFile.summaries``) with the turn it was made
for, and reused by every later turn it still covers enough of: a conversation is summarized
again only when more of it stops fitting, and then the previous summary plus the turns after
it are what the summarizer reads. The turns themselves are never removed from the file.

The summarizer is asked through the router's private socket, as any client would ask it, so
that the router pages it in within the memory budget like any tenant. The worker awaits it on
its event loop between two preparations of the request (the preparing thread is never held:
the summarizer may be this very tenant, whose own request needs that thread), for a bounded time.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from zoo_agent.jsonbound import loads
from zoo_agent.resident.sessions.transcript import SessionSummary, SessionTurn

if TYPE_CHECKING:
    import httpx

__all__ = ["NeedSummary", "Summarizer", "SummaryFailed", "condensed", "marker_message", "summary_message"]

log = logging.getLogger("zoo_agent.resident")

#: The summarizer's whole answer (a chat completion of at most ``max_tokens`` tokens): far below this.
MAX_ANSWER_BYTES = 256 << 10
#: A summary longer than this is no summary (the prompt keeps room for a few hundred tokens of it).
MAX_SUMMARY_CHARS = 32 << 10

INSTRUCTION = ("Summarize the conversation below in a few sentences. Keep names, numbers, facts, decisions and open questions; "
               "leave out greetings. Write only the summary.")  # fmt: skip


class SummaryFailed(Exception):
    """The summarizer did not answer (not loaded in time, refused, failed), or answered something
    the session's model could not take (not text, not Unicode, too long): the turns are left out instead."""


@dataclass
class NeedSummary:
    """A route turn whose prompt needs a summary of the first ``covers`` turns that nobody made yet."""

    covers: int
    messages: list[dict[str, str]]  # what the summarizer reads
    max_tokens: int  # the room the prompt keeps for it


def summary_message(summary: SessionSummary) -> dict[str, str]:
    return {"role": "system", "content": f"Summary of the first {_turns(summary.covers)} of this conversation: {summary.text}"}


def marker_message(left_out: int) -> dict[str, str]:
    return {"role": "system", "content": f"[The first {_turns(left_out)} of this conversation are left out: they do not fit this model's context.]"}


def _turns(n: int) -> str:
    return f"{n} turn{'s' if n != 1 else ''}"


def condensed(previous: SessionSummary | None, turns: list[SessionTurn]) -> list[dict[str, str]]:
    """What the summarizer reads: the previous summary (what it covers is not read again), then the turns after it."""
    lines = [f"Summary so far: {previous.text}"] if previous is not None else []
    for turn in turns:
        lines += [f"{m.role.capitalize()}: {m.content}" for m in turn.messages if m.role != "system"]
    return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": "\n".join(lines)}]


@dataclass
class Summarizer:
    """One route's summarizer tenant, asked over the router's private unix socket."""

    socket: Path
    tenant: str
    api_key: str | None = None
    timeout: float = 120.0
    max_tokens: int = 128

    async def summarize(self, messages: list[dict[str, str]], max_tokens: int | None = None) -> tuple[str, str]:
        """The summary and the model@version that wrote it; ``SummaryFailed`` for no answer or an unusable one."""
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.tenant, "messages": messages, "max_tokens": min(self.max_tokens, max_tokens or self.max_tokens), "temperature": 0}
        transport = httpx.AsyncHTTPTransport(uds=str(self.socket))
        try:
            async with asyncio.timeout(self.timeout):  # the whole exchange: an answer trickling in is bounded too
                async with httpx.AsyncClient(transport=transport, base_url="http://resident", timeout=self.timeout) as client:
                    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                        raw = await _read(response, MAX_ANSWER_BYTES)
        except httpx.HTTPError as exc:
            raise SummaryFailed(f"summarizer {self.tenant}: {type(exc).__name__}: {exc}") from exc
        except TimeoutError:
            raise SummaryFailed(f"summarizer {self.tenant}: no whole answer within {self.timeout:.0f}s") from None
        if raw is None:
            raise SummaryFailed(f"summarizer {self.tenant}: an answer larger than {MAX_ANSWER_BYTES} bytes")
        try:
            document = loads(raw)
        except ValueError as exc:
            if response.status_code == 200:
                raise SummaryFailed(f"summarizer {self.tenant}: an answer that is {exc}") from None
            document = {}
        if not isinstance(document, dict):
            document = {}
        if response.status_code != 200:
            error = document.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            shown = message if isinstance(message, str) else raw[:200].decode("utf-8", "replace")
            raise SummaryFailed(f"summarizer {self.tenant}: answered {response.status_code}: {_printable(shown)}")
        return _usable(self.tenant, document), _fingerprint(document) or self.tenant


async def _read(response: httpx.Response, limit: int) -> bytes | None:
    """The body, or None past ``limit`` bytes (read no further)."""
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)


def _usable(tenant: str, document: dict[str, object]) -> str:
    """The summary text, if the session's model can take it: a string of Unicode text (a lone
    surrogate made the user's turn fail), not blank, not longer than a summary can be."""
    try:
        content = document["choices"][0]["message"]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        raise SummaryFailed(f"summarizer {tenant}: an answer without a message") from None
    if not isinstance(content, str):
        raise SummaryFailed(f"summarizer {tenant}: a summary that is not text ({type(content).__name__})")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:
        raise SummaryFailed(f"summarizer {tenant}: a summary holding a lone surrogate, which is not Unicode text") from None
    text = content.strip()
    if not text:
        raise SummaryFailed(f"summarizer {tenant}: an empty summary")
    if len(text) > MAX_SUMMARY_CHARS:
        raise SummaryFailed(f"summarizer {tenant}: a summary of {len(text)} characters (at most {MAX_SUMMARY_CHARS})")
    return text


def _fingerprint(document: dict[str, object]) -> str | None:
    """The answer's model@version, when it is one short line of Unicode text."""
    value = document.get("system_fingerprint")
    if not isinstance(value, str) or not value or len(value) > 200 or not value.isprintable():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _printable(text: str) -> str:
    """Text from someone else, fit for one log line."""
    return "".join(c if c.isprintable() else "?" for c in text[:200])
