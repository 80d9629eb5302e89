"""Routes (issue #21): the decision is a pure function, checked against a literal table; validation refuses what cannot work."""

from __future__ import annotations

from typing import Any

import pytest

from zoo_agent.index.checks import semantic_problems
from zoo_agent.index.model import Index, RouteEntry
from zoo_agent.resident.routing import candidates, choose, features

ROUTE = RouteEntry.model_validate({
    "rules": [
        {"tenant": "code", "when": {"code": True}},
        {"tenant": "large", "when": {"keywords": ["explain", "analyze", "design"]}, "name": "deep"},
        {"tenant": "large", "when": {"min_messages": 6}},
        {"tenant": "small", "when": {"max_words": 12}},
    ],
    "default": "large",
    "fallback": ["small"],
})


def chat(*contents: str) -> dict[str, Any]:
    roles = ["user", "assistant"]
    return {"model": "assistant", "messages": [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]}


LONG = " ".join(["word"] * 40)


@pytest.mark.parametrize(
    ("document", "tenant", "rule"),
    [
        (chat("What is a zoo?"), "small", "words<=12"),
        (chat(LONG), "large", "default"),  # no rule: the default closes the list
        (chat("Please explain transformers"), "large", "deep"),  # ties: the first matching rule wins, in order
        (chat("EXPLAIN it"), "large", "deep"),  # keywords are case-insensitive whole words
        (chat("unexplainable"), "small", "words<=12"),  # ... whole words only
        (chat("fix this:\n```\nprint(1)\n```"), "code", "code"),
        (chat("def f(x):\n    return x"), "code", "code"),
        (chat("a short one", "ok", "b", "c", "d", "why?"), "large", "messages>=6"),  # the conversation grew past the bound
        (chat("a short one", "ok", "b", "c", "why?"), "small", "words<=12"),
        (chat(""), "small", "words<=12"),  # an empty message has 0 words
        ({"model": "assistant", "messages": []}, "small", "words<=12"),
        ({"model": "assistant", "prompt": "Once upon a time"}, "small", "words<=12"),  # a completion: its prompt, 1 message
        (chat("Hello", "Hi!", "And now " + LONG), "large", "default"),  # the last user message counts, not the first
    ],
)
def test_the_routing_table(document: dict[str, Any], tenant: str, rule: str) -> None:
    assert choose(ROUTE, features(document)) == (tenant, rule)


def test_candidates_are_the_choice_then_the_default_then_the_fallbacks_once_each() -> None:
    assert candidates(ROUTE, "large") == ["large", "small"]
    assert candidates(ROUTE, "code") == ["code", "large", "small"]


def _index(routes: dict[str, Any], host_routes: list[str], served: tuple[str, ...] = ("small", "large")) -> Index:
    file = {"path": "m.safetensors", "sha256": "a" * 64, "size": 1}
    return Index.model_validate({
        "models": {"m": {"version": "1", "source": {"type": "file", "path": "m"}, "files": [file], "license": "MIT"}},
        "tenants": {t: {"model": "m"} for t in ("small", "large", "other")},
        "routes": routes,
        "hosts": {"h": {"tenants": list(served), "routes": host_routes}},
    })


@pytest.mark.parametrize(
    ("routes", "host_routes", "pointer", "words"),
    [
        ({"r": {"default": "nope"}}, ["r"], "/routes/r/default", "unknown tenant 'nope'"),
        ({"r": {"default": "small", "rules": [{"tenant": "q", "when": {}}]}, "q": {"default": "r"}}, ["r"], "/routes/r/rules/0/tenant",
         "routes name tenants, not routes"),
        ({"r": {"default": "small", "rules": [{"tenant": "large", "when": {"min_words": 9, "max_words": 3}}]}}, ["r"],
         "/routes/r/rules/0/when", "can never match: min_words 9 > max_words 3"),
        ({"r": {"default": "small", "rules": [{"tenant": "large"}, {"tenant": "small", "when": {"code": True}}]}}, ["r"],
         "/routes/r/rules/1", "can never match: rule 0 before it matches every request"),
        ({"small": {"default": "large"}}, [], "/routes/small", "also a tenant id"),
        ({"r": {"default": "other"}}, ["r"], "/hosts/h/routes/0", "names tenant other, which host h does not serve"),
        ({}, ["r"], "/hosts/h/routes/0", "unknown route 'r'"),
    ],
)
def test_validation_refuses_what_cannot_route(routes: dict[str, Any], host_routes: list[str], pointer: str, words: str) -> None:
    problems = [p for p in semantic_problems(_index(routes, host_routes)) if p.pointer.startswith(("/routes", "/hosts/h/routes"))]
    assert any(p.pointer == pointer and words in p.message for p in problems), problems


def test_a_sound_route_passes() -> None:
    routes = {"assistant": {"rules": [{"tenant": "small", "when": {"max_words": 12}}], "default": "large", "fallback": ["small"]}}
    assert [p for p in semantic_problems(_index(routes, ["assistant"])) if "route" in p.pointer] == []
