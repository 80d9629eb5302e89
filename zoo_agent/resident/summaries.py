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

import logging
from dataclasses import dataclass
from pathlib import Path

from zoo_agent.resident.transcript import SessionSummary, SessionTurn

__all__ = ["NeedSummary", "Summarizer", "SummaryFailed", "condensed", "marker_message", "summary_message"]

log = logging.getLogger("zoo_agent.resident")

INSTRUCTION = ("Summarize the conversation below in a few sentences. Keep names, numbers, facts, decisions and open questions; "
               "leave out greetings. Write only the summary.")  # fmt: skip


class SummaryFailed(Exception):
    """The summarizer did not answer (not loaded in time, refused, failed): the turns are left out instead."""


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
        """The summary and the model@version that wrote it."""
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.tenant, "messages": messages, "max_tokens": min(self.max_tokens, max_tokens or self.max_tokens), "temperature": 0}
        transport = httpx.AsyncHTTPTransport(uds=str(self.socket))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://resident", timeout=self.timeout) as client:
                response = await client.post("/v1/chat/completions", json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise SummaryFailed(f"summarizer {self.tenant}: {type(exc).__name__}: {exc}") from exc
        try:
            document = response.json()
        except ValueError:
            document = {}
        if response.status_code != 200:
            message = document.get("error", {}).get("message") if isinstance(document.get("error"), dict) else None
            raise SummaryFailed(f"summarizer {self.tenant}: answered {response.status_code}: {message or response.text[:200]}")
        try:
            text = str(document["choices"][0]["message"]["content"]).strip()
        except (KeyError, IndexError, TypeError) as exc:
            raise SummaryFailed(f"summarizer {self.tenant}: an answer without a message") from exc
        if not text:
            raise SummaryFailed(f"summarizer {self.tenant}: an empty summary")
        return text, str(document.get("system_fingerprint") or self.tenant)
