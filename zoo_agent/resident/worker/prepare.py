"""A request made ready to generate (issue #5), on the app's preparing thread: the adapter its
``model`` names, its session turn, its sampling, and its prompt counted against the limits.

The limit is one number (issue #33): the tenant's ``resources.max_context`` (``ServingState.max_context``),
bounded by the model's own positions where those end sooner. Prompt plus ``max_tokens`` must fit in it:
a prompt that leaves no room is a 400 naming ``messages`` or ``prompt``; a ``max_tokens`` the request
names past what is left is a 400 naming ``max_tokens``; the tenant's default is lowered to what is left.
A session keeps of its transcript what fits beside the completion."""

from __future__ import annotations

from dataclasses import replace

from zoo_agent.resident.engine.base import Request as GenRequest
from zoo_agent.resident.sessions.store import Turn
from zoo_agent.resident.sessions.summaries import NeedSummary
from zoo_agent.resident.sessions.transcript import SessionSummary
from zoo_agent.resident.sessions.turns import Refusal, session_turn
from zoo_agent.resident.worker.adapter_sets import Asked, Offer, asked
from zoo_agent.resident.worker.bodies import Body, XZoo
from zoo_agent.resident.worker.state import ServingState

__all__ = ["adapter_for", "context_limit", "prepare"]

#: What a context refusal names and its code (OpenAI's for a prompt past the model's context).
_NAMED = " (resources.max_context)"
_CODE = "context_length_exceeded"


def adapter_for(state: ServingState, model: str, x_zoo: XZoo | None = None) -> Asked | Refusal:
    """The `model` field: '<tenant>' is the base model, '<tenant>:<adapter>' an adapter, '<tenant>:auto' a choice,
    '<tenant>:a+b' (or ``x_zoo.adapters``) a set at the caller's scales; ``x_zoo.exclude`` what none may use (issue #36)."""
    adapters = state.backend.adapters
    offer = Offer(state.tenant, state.model, adapters.declared if adapters is not None else (), adapters.refused if adapters is not None else {},
                  adapters.max_loras if adapters is not None else 0, auto=state.backend.selector is not None)  # fmt: skip
    scaled = [(a.name, a.scale) for a in x_zoo.adapters] if x_zoo is not None and x_zoo.adapters is not None else None
    return asked(offer, model, scaled, x_zoo.exclude if x_zoo is not None else ())


def prepare(state: ServingState, body: Body, messages: list[dict[str, str]] | None, prompt: str | None, adapter: str | None,
            chat: bool, priority: int = 0, route: str | None = None, fresh: SessionSummary | None = None) -> GenRequest | NeedSummary | Refusal:  # fmt: skip
    """The generation request, its session turn built and its prompt counted (on the preparing thread)."""
    d = state.defaults
    field_name = "messages" if chat else "prompt"
    if (refused := _too_long(state, messages, prompt, field_name)) is not None:
        return refused
    limit = context_limit(state)
    turn = None
    if getattr(body, "session", None) is not None and messages is not None:
        # The completion's room: what the request names, else the default, at most half the context (the transcript keeps the rest).
        made = _session_turn(state, body, messages, body.max_tokens or min(d["max_tokens"], limit // 2), route, fresh)
        if isinstance(made, Refusal | NeedSummary):
            return made
        turn, messages = made
    request = GenRequest(
        messages, prompt, body.max_tokens or d["max_tokens"],
        d["temperature"] if body.temperature is None else body.temperature,
        body.top_p if body.top_p is not None else d["top_p"], d.get("top_k", 0),
        body.seed if body.seed is not None else d.get("seed"), body.ignore_eos, adapter, turn, body.stops(), priority=priority,
    )  # fmt: skip
    prompt_tokens = state.backend.count_tokens(request)
    if prompt_tokens == 0:
        return Refusal(400, f"{field_name}: encodes to no tokens", param=field_name)
    if prompt_tokens >= limit:  # not one token left to generate
        return Refusal(400, f"{field_name}: {prompt_tokens} tokens do not fit the context of {limit} tokens{_NAMED}; at most {limit - 1}",
                       param=field_name, code=_CODE)  # fmt: skip
    left = limit - prompt_tokens
    if request.max_tokens > left:
        if body.max_tokens is None:  # the tenant's default, not the caller's number: lowered to what is left
            return replace(request, max_tokens=left)
        return Refusal(400, f"max_tokens: {request.max_tokens} with a prompt of {prompt_tokens} tokens passes the context of {limit} tokens"
                            f"{_NAMED}; at most {left}", param="max_tokens", code=_CODE)  # fmt: skip
    return request


def context_limit(state: ServingState) -> int:
    """Prompt plus completion tokens a request may hold: the tenant's declared context, bounded by the
    model's own positions where it names fewer (the Ollama daemon's backend names none)."""
    own = state.backend.context_length()
    return min(state.max_context, own) if own else state.max_context


def _too_long(state: ServingState, messages: list[dict[str, str]] | None, prompt: str | None, field_name: str) -> Refusal | None:
    """A prompt that cannot fit whatever its tokens, refused before it is tokenized (a 1 MiB prompt took the
    preparing thread about a second to count): no token covers more than the tokenizer's longest one, so
    n characters are at least n / longest tokens. A backend that does not know its longest token (the
    Ollama daemon's: its count is already an estimate from the characters; a tokenizer that drops text)
    counts every prompt."""
    longest = getattr(state.backend, "longest_token", None)
    most = longest() if longest is not None else None
    if most is None:
        return None
    limit = context_limit(state)
    chars = len(prompt or "") if messages is None else sum(len(m.get("content") or "") for m in messages)
    if chars <= limit * most:
        return None
    return Refusal(400, f"{field_name}: {chars} characters, more than {limit} tokens can hold (this model's tokens are at most {most} characters)",
                   param=field_name)  # fmt: skip


def _session_turn(state: ServingState, body: Body, messages: list[dict[str, str]], max_tokens: int, route: str | None,
                  fresh: SessionSummary | None) -> tuple[Turn, list[dict[str, str]]] | NeedSummary | Refusal:  # fmt: skip
    """The tenant's sessions, or the route's, and the room its prompt has."""
    sessions = state.backend.sessions if route is None else state.route_sessions.get(route)

    def budget() -> int:
        # The same limit as the 400s': a session on a small context leaves turns out, it does not fail.
        return context_limit(state) - max_tokens

    summarizer = state.summarizers.get(sessions.route or "") if route is not None and sessions is not None else None
    return session_turn(state.backend, sessions, getattr(body, "session", None), messages, budget, route, summarizer, fresh)
