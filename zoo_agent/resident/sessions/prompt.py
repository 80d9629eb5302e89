"""A session's prompt as token ids, with the oldest turns dropped when it does not fit (issues #9, #17).

Re-rendering an answer as text and tokenizing it again need not give the ids the model
produced, so a saved cache would match only a short prefix. The prompt is instead built
from the committed turns' own ids: the first turn kept is rendered and tokenized whole;
every later turn adds its completion ids and the tokens of the text the chat template
writes between the previous reply and its own prompt. The transcript alone gives the same
ids, so a restored cache and a re-prefill see exactly the same prompt.

That text between two turns is found by rendering a window of those two turns only, so
each turn is rendered and tokenized once, from the newest back, and the walk stops at the
first turn that no longer fits: linear in the turns kept. Rendering the whole history once
per dropped turn (as before) took minutes for a 300-turn session, on the event loop, and
the supervisor killed the unresponsive worker. A template that is not append-only (the
window's text does not start with the text before it) gets the whole-history rendering.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zoo_agent.resident.sessions.transcript import SessionTurn

__all__ = ["conversation_ids", "rendered_prompt", "session_prompt"]


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def conversation_ids(tokenizer: Any, history: list[SessionTurn], new_messages: list[dict[str, str]]) -> list[int]:
    """The whole conversation's prompt ids, no turn dropped."""
    return session_prompt(tokenizer, history, new_messages, budget=None)[1]


def session_prompt(tokenizer: Any, history: list[SessionTurn], new_messages: list[dict[str, str]], budget: int | None, *,
                   native: Callable[[SessionTurn], bool] | None = None, preface: list[dict[str, str]] | None = None) -> tuple[int, list[int]]:  # fmt: skip
    """``(dropped, ids)``: the fewest oldest turns left out so that the prompt has at most
    ``budget`` tokens (all of them, when even the new messages alone do not fit).

    A turn another model answered (``native`` false: a route session moved, issue #21) has no
    ids of this tokenizer: its reply's text is tokenized instead, so the whole conversation is
    in this model's own chat template. ``preface`` (a summary or a marker of left-out turns)
    comes before the first turn kept."""
    prompts = [[m.model_dump() for m in t.messages[:-1]] for t in history] + [new_messages]
    n = len(history)
    head = list(preface or [])

    def own_ids(turn: SessionTurn) -> list[int]:
        return turn.completion_ids if native is None or native(turn) else _tokens(tokenizer, turn.messages[-1].content)

    later: list[list[int]] = []  # per turn after the candidate, newest first: the template's text, then the completion
    later_len = 0
    best: tuple[int, list[int], int] | None = None  # the oldest turn kept, its own ids, how many of `later` follow
    for k in range(n, -1, -1):  # k: the oldest turn kept (n: only the new messages)
        own = own_ids(history[k]) if k < n else []
        first = _tokens(tokenizer, _render(tokenizer, [*head, *prompts[k]]))
        fits = budget is None or len(first) + len(own) + later_len <= budget
        if best is not None and not fits:
            break
        best = (k, [*first, *own], len(later))
        if not fits or k == 0:
            break
        between = _between(tokenizer, history[k - 1], own_ids(history[k - 1]), prompts[k - 1], prompts[k])
        if between is None:
            return _whole_history(tokenizer, history, new_messages, budget, head)
        later.append(between + own)
        later_len += len(later[-1])
    assert best is not None
    kept, ids, following = best
    for segment in reversed(later[:following]):
        ids += segment
    return kept, ids


def rendered_prompt(tokenizer: Any, history: list[SessionTurn], new_messages: list[dict[str, str]], budget: int | None) -> tuple[int, list[int]]:
    """``(dropped, ids)`` for an engine that renders the conversation itself (llama.cpp's, issue #33): the
    messages, as that engine's template renders them and its tokenizer reads them, with the fewest oldest
    turns left out so that it has at most ``budget`` tokens. Rendered whole once; bisected only when it does not fit."""
    whole = _tokens(tokenizer, _render(tokenizer, [m.model_dump() for t in history for m in t.messages] + new_messages))
    if budget is None or len(whole) <= budget or not history:
        return 0, whole
    return _whole_history(tokenizer, history, new_messages, budget, [])


def _between(tokenizer: Any, previous: SessionTurn, previous_ids: list[int], previous_prompt: list[dict[str, str]],
             prompt: list[dict[str, str]]) -> list[int] | None:  # fmt: skip
    """The tokens the template writes after ``previous``'s reply up to the generation prompt of
    the next turn, from a window of those two turns; None for a template that is not append-only."""
    reply = previous.messages[-1]
    before = _render(tokenizer, previous_prompt) + reply.content
    text = _render(tokenizer, [*previous_prompt, reply.model_dump(), *prompt])
    if not text.startswith(before):
        return None
    ids = _tokens(tokenizer, text[len(before):])
    if previous_ids[-1:] == [tokenizer.eos_token_id] and ids[:1] == [tokenizer.eos_token_id]:
        ids = ids[1:]  # the reply ended with the end token the template also writes
    return ids


def _whole_history(tokenizer: Any, history: list[SessionTurn], new_messages: list[dict[str, str]], budget: int | None,
                   preface: list[dict[str, str]]) -> tuple[int, list[int]]:  # fmt: skip
    """For templates that rewrite earlier text: the whole conversation, rendered and tokenized
    whole; the turns dropped found by bisection (a prompt grows with every turn kept)."""

    def ids_from(k: int) -> list[int]:
        messages = preface + [m.model_dump() for t in history[k:] for m in t.messages] + new_messages
        return _tokens(tokenizer, _render(tokenizer, messages))

    low, high = 0, len(history)  # the answer is in [low, high]
    while low < high and budget is not None:
        mid = (low + high) // 2
        if len(ids_from(mid)) <= budget:
            high = mid
        else:
            low = mid + 1
    return low, ids_from(low)
