"""Which tenant answers a request for a route: a pure decision over the request's features (issue #21).

The router reads the features once (no tokenizer: words, keywords, code, the conversation's
length), the rules are tried in order, the first match wins and the route's ``default``
closes the list. The candidates after the chosen tenant are where a request goes when the
chosen one cannot answer before its first token (``fallback``).

Similarity to a described task (``similar_to``) is a feature like the others: the router
embeds the message (resident/similarity.py) only when ``needs_similarity`` says a
similarity rule would be reached, and passes the numbers in; this module never embeds.
A similarity rule without a number (an empty message, no embedder) does not match.

Every feature is linear in the message (at most the 1 MiB body) with no backtracking across
lines (issue #31): the router reads a large one off its event loop all the same.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from zoo_agent.index.model import RouteEntry, RouteRule, RouteWhen

__all__ = ["Choice", "Features", "candidates", "choose", "features", "label", "last_user_text", "needs_similarity"]

_WORD = re.compile(r"\w+", re.UNICODE)
# Code-like lines: a statement ending in ; or {, a def/class/import/#include, an arrow function.
# Linear in the text (issue #31): the whitespace around a line's ends is ``[^\S\n]*``, never
# ``\s*``, which also ate newlines: at each line start it ran to the end of a run of blank lines
# and back, so 52 kB of newlines took tens of seconds (1 MiB: hours). Each run of blanks is now
# scanned from one place only (its line start, or the ; or { before it); it matches the same texts.
_CODE_LINE = re.compile(r"(?m)^[^\S\n]*(?:def |class |import |from \S+ import |#include|fn |func |public |function |const |let |var |SELECT |for \(|if \()"
                        r"|[;{][^\S\n]*$|=>")  # fmt: skip


@dataclass(frozen=True)
class Features:
    words: int
    keywords: frozenset[str]  # the message's words, lowercased
    code: bool
    messages: int
    similarity: Mapping[str, float] = field(default_factory=dict)  # similar_to text -> cosine similarity of the message


class Choice(NamedTuple):
    tenant: str
    rule: str  # the rule's label, or 'default'
    similarity: float | None  # the deciding similarity rule's score, else the best one evaluated before the choice; None: none evaluated


def last_user_text(document: dict[str, Any]) -> str:
    """What the rules read: a chat body's last user message, or a completion body's prompt."""
    messages = document.get("messages")
    if isinstance(messages, list):
        users = [str(m["content"]) for m in messages if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)]
        return users[-1] if users else ""
    prompt = document.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def features(document: dict[str, Any], similarity: Mapping[str, float] | None = None) -> Features:
    """From a chat body (its last user message) or a completion body (its prompt)."""
    messages = document.get("messages")
    count = len(messages) if isinstance(messages, list) else 1
    text = last_user_text(document)
    words = _WORD.findall(text)
    return Features(len(words), frozenset(w.lower() for w in words), "```" in text or bool(_CODE_LINE.search(text)), count, similarity or {})


def _similar(when: RouteWhen, f: Features) -> bool:
    if when.similar_to is None:
        return True
    score = f.similarity.get(when.similar_to)
    return score is not None and score >= when.threshold


def matches(when: RouteWhen, f: Features) -> bool:
    return (
        (when.min_words is None or f.words >= when.min_words)
        and (when.max_words is None or f.words <= when.max_words)
        and (not when.keywords or any(k.lower() in f.keywords for k in when.keywords))
        and (when.code is None or f.code == when.code)
        and (when.min_messages is None or f.messages >= when.min_messages)
        and (when.max_messages is None or f.messages <= when.max_messages)
        and _similar(when, f)
    )


def label(rule: RouteRule) -> str:
    """The rule's name, else its conditions: 'words<=12', 'code', 'keywords:explain|design,messages>=4'."""
    if rule.name:
        return rule.name
    w, parts = rule.when, []
    if w.min_words is not None:
        parts.append(f"words>={w.min_words}")
    if w.max_words is not None:
        parts.append(f"words<={w.max_words}")
    if w.keywords:
        parts.append("keywords:" + "|".join(w.keywords))
    if w.code is not None:
        parts.append("code" if w.code else "no-code")
    if w.min_messages is not None:
        parts.append(f"messages>={w.min_messages}")
    if w.max_messages is not None:
        parts.append(f"messages<={w.max_messages}")
    if w.similar_to is not None:
        parts.append(f"similar>={w.threshold:g}")
    return ",".join(parts) or "always"


def choose(route: RouteEntry, f: Features) -> Choice:
    """The first rule that matches chooses (else the default), with the similarity that was seen."""
    seen: float | None = None
    for rule in route.rules:
        score = f.similarity.get(rule.when.similar_to) if rule.when.similar_to is not None else None
        if matches(rule.when, f):
            return Choice(rule.tenant, label(rule), score if score is not None else seen)
        if score is not None:
            seen = score if seen is None else max(seen, score)
    return Choice(route.default, "default", seen)


def needs_similarity(route: RouteEntry, f: Features) -> bool:
    """Whether a similarity rule would be tried: no rule before the first ``similar_to`` one matches
    (so a request an earlier rule decides is never embedded)."""
    for rule in route.rules:
        if rule.when.similar_to is not None:
            return True
        if matches(rule.when, f):
            return False
    return False


def candidates(route: RouteEntry, chosen: str) -> list[str]:
    """The chosen tenant, then the default, then the fallbacks: each once, in that order."""
    return list(dict.fromkeys([chosen, route.default, *route.fallback]))
