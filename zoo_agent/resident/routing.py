"""Which tenant answers a request for a route: a pure decision over the request's features (issue #21).

The router reads the features once (no tokenizer: words, keywords, code, the conversation's
length), the rules are tried in order, the first match wins and the route's ``default``
closes the list. The candidates after the chosen tenant are where a request goes when the
chosen one cannot answer before its first token (``fallback``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from zoo_agent.index.model import RouteEntry, RouteRule, RouteWhen

__all__ = ["Features", "candidates", "choose", "features", "label"]

_WORD = re.compile(r"\w+", re.UNICODE)
# Code-like lines: a statement ending in ; or {, a def/class/import/#include, an arrow function.
_CODE_LINE = re.compile(r"(?m)^\s*(?:def |class |import |from \S+ import |#include|fn |func |public |function |const |let |var |SELECT |for \(|if \().*"
                        r"|[;{]\s*$|=>")  # fmt: skip


@dataclass(frozen=True)
class Features:
    words: int
    keywords: frozenset[str]  # the message's words, lowercased
    code: bool
    messages: int


def features(document: dict[str, Any]) -> Features:
    """From a chat body (its last user message) or a completion body (its prompt)."""
    messages = document.get("messages")
    text = ""
    count = 1
    if isinstance(messages, list):
        count = len(messages)
        users = [str(m["content"]) for m in messages if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)]
        text = users[-1] if users else ""
    elif isinstance(prompt := document.get("prompt"), str):
        text = prompt
    words = _WORD.findall(text)
    return Features(len(words), frozenset(w.lower() for w in words), "```" in text or bool(_CODE_LINE.search(text)), count)


def matches(when: RouteWhen, f: Features) -> bool:
    return (
        (when.min_words is None or f.words >= when.min_words)
        and (when.max_words is None or f.words <= when.max_words)
        and (not when.keywords or any(k.lower() in f.keywords for k in when.keywords))
        and (when.code is None or f.code == when.code)
        and (when.min_messages is None or f.messages >= when.min_messages)
        and (when.max_messages is None or f.messages <= when.max_messages)
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
    return ",".join(parts) or "always"


def choose(route: RouteEntry, f: Features) -> tuple[str, str]:
    """(tenant, the rule that chose it: its label, or 'default')."""
    for rule in route.rules:
        if matches(rule.when, f):
            return rule.tenant, label(rule)
    return route.default, "default"


def candidates(route: RouteEntry, chosen: str) -> list[str]:
    """The chosen tenant, then the default, then the fallbacks: each once, in that order."""
    return list(dict.fromkeys([chosen, route.default, *route.fallback]))
