"""A session turn's prompt (issues #16, #21, #32): the session's turns that fit, or for a route
session, the ones that do not replaced by the route's summary of them or by a marker.

Decisions only, on the caller's thread: the worker's app asks here and answers what it
gets (a turn, a summary to make first, or a ``Refusal`` it turns into its error body).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from zoo_agent.formats import now
from zoo_agent.resident.sessions.store import SessionDamaged, SessionError, Sessions, Turn, valid_id
from zoo_agent.resident.sessions.summaries import (
    NeedSummary,
    Summarizer,
    SummaryFailed,
    condensed,
    marker_message,
    summary_message,
)
from zoo_agent.resident.sessions.transcript import SessionFile, SessionSummary, SessionTurn

__all__ = ["PromptModel", "Refusal", "damaged", "route_turn", "session_document", "session_turn", "summarize"]

log = logging.getLogger("zoo_agent.resident")


@dataclass(frozen=True)
class Refusal:
    """A turn refused, as the worker answers it: an OpenAI error's status, message, param and code."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None


class PromptModel(Protocol):
    """What a turn needs of the tenant's backend: its session prompt, in its tokens."""

    def session_prompt(self, history: list[SessionTurn], new_messages: list[dict[str, str]], budget: int | None, *,
                       native: Callable[[SessionTurn], bool] | None = None, preface: list[dict[str, str]] | None = None) -> tuple[int, list[int]]: ...  # fmt: skip

    def truncate(self, text: str, tokens: int) -> str: ...


def damaged(sid: str, exc: SessionDamaged) -> Refusal:
    """A damaged session file fails its own requests only, with a 4xx naming it (issue #17)."""
    where = f"{exc.pointer}: " if exc.pointer else ""
    return Refusal(422, f"session '{sid}' is damaged ({where}{exc.problem}); delete it (DELETE /v1/sessions/{sid}) or import a good copy",
                   param="session", code="session_damaged")  # fmt: skip


def session_document(sessions: Sessions | None, sid: str) -> dict[str, Any] | Refusal:
    """GET /v1/sessions/{sid}: the transcript as a document, or why not."""
    try:
        transcript = sessions.load(valid_id(sid)) if sessions is not None else None
    except SessionDamaged as exc:
        return damaged(sid, exc)
    except SessionError as exc:
        return Refusal(400, str(exc), param="session")
    if transcript is None:
        return Refusal(404, f"session '{sid}' does not exist", param="session", code="session_not_found")
    return transcript.document()


def session_turn(model: PromptModel, sessions: Sessions | None, sid: str | None, messages: list[dict[str, str]], budget: Callable[[], int],
                 route: str | None = None, summarizer: Summarizer | None = None,
                 fresh: SessionSummary | None = None) -> tuple[Turn, list[dict[str, str]]] | NeedSummary | Refusal:  # fmt: skip
    """The whole conversation for the prompt: the session's turns, oldest dropped when they no longer fit, then the new messages.
    ``sessions``: the tenant's, or the route's; ``budget``: the prompt's room in tokens, asked once the session is read."""
    if route is not None and sessions is None:
        return Refusal(400, f"session: route '{route[:64]}' has no sessions here", param="session")
    if sessions is None or sid is None:
        return Refusal(400, "session: sessions are not available here", param="session")
    try:
        transcript = sessions.load(valid_id(sid))
    except SessionDamaged as exc:
        return damaged(sid, exc)
    except SessionError as exc:
        return Refusal(400, str(exc), param="session")
    turns = transcript.turns if transcript is not None else []
    room = budget()
    if route is not None:
        return route_turn(model, sessions, sid, transcript, messages, room, summarizer, fresh)
    dropped, ids = model.session_prompt(turns, messages, room)
    turn = Turn(sid, messages, dropped, history=turns[dropped:], cache="none" if not turns else "pending", prompt_ids=ids)
    return turn, Sessions.messages(transcript, dropped) + messages


def route_turn(model: PromptModel, sessions: Sessions, sid: str, transcript: SessionFile | None, messages: list[dict[str, str]],
               budget: int, summarizer: Summarizer | None, fresh: SessionSummary | None) -> tuple[Turn, list[dict[str, str]]] | NeedSummary:  # fmt: skip
    """A route session's prompt on this tenant's model (issue #21): every turn, in this model's
    template; when they do not fit, the oldest are replaced by the route's summary of them
    (reused while it covers enough, made anew when more must go) or by a marker."""
    turns = transcript.turns if transcript is not None else []
    dropped, ids = model.session_prompt(turns, messages, budget, native=sessions.native)
    turn = Turn(sid, messages, 0, cache="none" if not turns else "pending", store=sessions)
    preface: list[dict[str, str]] = []
    if dropped:
        reserve = min(256, budget // 4)  # room for the summary or the marker in front
        dropped, _ = model.session_prompt(turns, messages, budget - reserve, native=sessions.native)
        latest = transcript.summaries[-1] if transcript is not None and transcript.summaries else None
        if latest is not None and latest.covers >= dropped:
            dropped, turn.summary, preface = latest.covers, "reused", [summary_message(latest)]
        elif fresh is not None and fresh.covers >= dropped and fresh.text:
            # At most the room reserved for it, in this model's tokens (the summarizer counts in its own).
            fresh = fresh.model_copy(update={"text": model.truncate(fresh.text, reserve * 3 // 4)})
            dropped, turn.new_summary, turn.summary, preface = fresh.covers, fresh, "new", [summary_message(fresh)]
        elif summarizer is not None and fresh is None:
            return NeedSummary(dropped, condensed(latest, turns[latest.covers if latest else 0 : dropped]), max(16, reserve // 2))
        if not preface:
            turn.summary, preface = "marker", [marker_message(dropped)]
        more, ids = model.session_prompt(turns[dropped:], messages, budget, native=sessions.native, preface=preface)
        if more:  # the summary itself took more room than reserved: later turns go too, without a summary
            ids = model.session_prompt(turns[dropped + more :], messages, budget, native=sessions.native, preface=preface)[1]
            dropped += more
    turn.dropped_turns, turn.history, turn.prompt_ids = dropped, turns[dropped:], ids
    return turn, preface + Sessions.messages(transcript, dropped) + messages


async def summarize(summarizers: Mapping[str, Summarizer], route: str, need: NeedSummary) -> SessionSummary:
    """The route's summarizer's summary; one with no text (then: a marker) when it cannot answer."""
    summarizer = summarizers[route]
    try:
        text, model = await summarizer.summarize(need.messages, need.max_tokens)
    except SummaryFailed as exc:
        log.warning("route %s: %s; the first %d turns of the session are left out instead", route, exc, need.covers)
        text, model = "", summarizer.tenant
    return SessionSummary(covers=need.covers, text=text, model=model, time=now())
