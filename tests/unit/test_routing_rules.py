"""Routes (issue #21): the decision is a pure function, checked against a literal table; validation refuses what cannot work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import REPO
from tests.support.routes import routes_document, routes_index
from zoo_agent.index.checks import semantic_problems
from zoo_agent.index.load import check_document
from zoo_agent.index.model import Index, RouteEntry
from zoo_agent.resident.routing import candidates, choose, features, needs_similarity

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
    assert choose(ROUTE, features(document)) == (tenant, rule, None)


REVIEW, TRANSLATE = "review this code for bugs", "translate this text into french"
SIMILAR = RouteEntry.model_validate({
    "rules": [
        {"tenant": "small", "when": {"max_words": 2}},
        {"tenant": "code", "when": {"similar_to": REVIEW, "min_similarity": 0.7}},
        {"tenant": "large", "when": {"similar_to": TRANSLATE}},  # the default threshold, 0.7
        {"tenant": "large", "when": {"similar_to": REVIEW, "min_similarity": 0.3, "min_messages": 3}, "name": "review-later"},
    ],
    "default": "small",
    "embedding_model": "e",
})
ASK = chat("please look over my function and tell me what is wrong")  # 11 words: past the first rule


@pytest.mark.parametrize(
    ("document", "scores", "expected"),
    [
        (ASK, {REVIEW: 0.9, TRANSLATE: 0.1}, ("code", "similar>=0.7", 0.9)),
        (ASK, {REVIEW: 0.7, TRANSLATE: 0.1}, ("code", "similar>=0.7", 0.7)),  # exactly at the threshold matches
        (ASK, {REVIEW: 0.6999, TRANSLATE: 0.1}, ("small", "default", 0.6999)),  # just below: the default, with the best score seen
        (ASK, {REVIEW: 0.8, TRANSLATE: 0.8}, ("code", "similar>=0.7", 0.8)),  # ties: the first rule in order wins
        (ASK, {REVIEW: 0.2, TRANSLATE: 0.75}, ("large", "similar>=0.7", 0.75)),
        (chat("a", "b", "please look over my function"), {REVIEW: 0.4, TRANSLATE: 0.0}, ("large", "review-later", 0.4)),  # the same task, a lower bar later
        (ASK, {}, ("small", "default", None)),  # not measured (no embedder): similarity rules never match
        (chat("ok thanks"), {REVIEW: 0.99}, ("small", "words<=2", None)),  # an earlier rule decides; similarity is not reported
        (chat(""), {}, ("small", "words<=2", None)),  # an empty message: 0 words, never embedded
    ],
)
def test_the_routing_table_with_similarity(document: dict[str, Any], scores: dict[str, float], expected: tuple[str, str, float | None]) -> None:
    assert choose(SIMILAR, features(document, scores)) == expected


def test_the_message_is_embedded_only_when_a_similarity_rule_would_be_tried() -> None:
    assert needs_similarity(SIMILAR, features(ASK))
    assert not needs_similarity(SIMILAR, features(chat("ok thanks")))  # rule 0 matches first
    assert not needs_similarity(ROUTE, features(ASK))  # no similarity rule at all


def test_candidates_are_the_choice_then_the_default_then_the_fallbacks_once_each() -> None:
    assert candidates(ROUTE, "large") == ["large", "small"]
    assert candidates(ROUTE, "code") == ["code", "large", "small"]


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
        ({"r": {"default": "small", "embedding_model": "ghost", "rules": [{"tenant": "large", "when": {"similar_to": "review code"}}]}}, ["r"],
         "/routes/r/embedding_model", "unknown model 'ghost' (declared models: e, m, o)"),
        ({"r": {"default": "small", "rules": [{"tenant": "large", "when": {"similar_to": "review code"}}]}}, ["r"],
         "/routes/r/rules/0/when/similar_to", "a similarity rule needs the route's 'embedding_model' (a declared model id)"),
        ({"r": {"default": "small", "embedding_model": "e", "rules": [{"tenant": "large", "when": {"min_similarity": 0.5}}]}}, ["r"],
         "/routes/r/rules/0/when/min_similarity", "needs 'similar_to'"),
        ({"r": {"default": "small", "embedding_model": "e", "rules": [{"tenant": "large", "when": {"max_words": 3}}]}}, ["r"],
         "/routes/r/embedding_model", "no rule has 'similar_to', so nothing uses it"),
        ({"r": {"default": "small", "embedding_model": "o", "rules": [{"tenant": "large", "when": {"similar_to": "x"}}]}}, ["r"],
         "/routes/r/embedding_model", "the router embeds with transformers; model 'o' has an 'ollama' source"),
    ],
)
def test_validation_refuses_what_cannot_route(routes: dict[str, Any], host_routes: list[str], pointer: str, words: str) -> None:
    problems = [p for p in semantic_problems(routes_index(routes, host_routes)) if p.pointer.startswith(("/routes", "/hosts/h/routes"))]
    assert any(p.pointer == pointer and words in p.message for p in problems), problems


@pytest.mark.parametrize(("when", "pointer", "words"), [
    ({"similar_to": "x", "min_similarity": 1.5}, "/routes/r/rules/0/when/min_similarity", "must be <= 1, got 1.5"),
    ({"similar_to": "x", "min_similarity": -2}, "/routes/r/rules/0/when/min_similarity", "must be >= -1, got -2"),
    ({"similar_to": ""}, "/routes/r/rules/0/when/similar_to", "must not be empty"),
])
def test_similarity_thresholds_out_of_range_are_refused(when: dict[str, Any], pointer: str, words: str) -> None:
    _, problems = check_document(routes_document({"r": {"default": "small", "embedding_model": "e", "rules": [{"tenant": "large", "when": when}]}}, ["r"]))
    assert [p.pointer for p in problems] == [pointer] and words in problems[0].message, problems


def test_a_sound_route_passes() -> None:
    routes = {"assistant": {"rules": [{"tenant": "small", "when": {"max_words": 12}}], "default": "large", "fallback": ["small"]}}
    assert [p for p in semantic_problems(routes_index(routes, ["assistant"])) if "route" in p.pointer] == []
    routes["assistant"].update(embedding_model="e", rules=[{"tenant": "small", "when": {"similar_to": "review code", "min_similarity": 0.5}}])
    assert [p for p in semantic_problems(routes_index(routes, ["assistant"])) if "route" in p.pointer] == []


def test_a_host_serving_a_similarity_route_fetches_its_embedding_model() -> None:
    from zoo_agent.plan import desired_for_host

    routes = {"r": {"default": "small", "embedding_model": "e", "rules": [{"tenant": "large", "when": {"similar_to": "review code"}}]}}
    assert ("models", "e") in [(w.kind, w.id) for w in desired_for_host(routes_index(routes, ["r"]), "h").wants]
    assert ("models", "e") not in [(w.kind, w.id) for w in desired_for_host(routes_index(routes, []), "h").wants]  # a route the host does not serve


def test_a_route_may_name_a_tenant_that_another_host_answers_for_peers() -> None:
    """"The small host handles simple, the large one complex" (issue #22): the route's default is served through a peer."""
    doc = routes_index({"r": {"rules": [{"tenant": "small", "when": {"max_words": 5}}], "default": "large"}}, ["r"], served=("small",)).model_dump(
        mode="json", by_alias=True, exclude_none=True)
    doc["hosts"]["p"] = {"tenants": ["large"], "endpoint": "http://p.lan:8000", "accept_from_peers": ["large"]}
    assert [p for p in semantic_problems(Index.model_validate(doc)) if "route" in p.pointer] == []
    doc["hosts"]["p"]["accept_from_peers"] = []
    problems = [p for p in semantic_problems(Index.model_validate(doc)) if "route" in p.pointer]
    assert [(p.pointer, p.message) for p in problems] == [
        ("/hosts/h/routes/0", "route 'r' names tenant large, which host h does not serve and no other host accepts from peers")]


# -- issue #31: every rule is linear in the message ------------------------------------------

#: The rules' code pattern before issue #31: ``\s*`` ran across blank lines from every line start (quadratic).
_OLD_CODE_LINE = re.compile(r"(?m)^\s*(?:def |class |import |from \S+ import |#include|fn |func |public |function |const |let |var |SELECT |for \(|if \().*"
                            r"|[;{]\s*$|=>")  # fmt: skip
_PIECES = ["\n", " ", "\t", "\r", "\x0b", "\u00a0", ";", "{", "=", ">", "def ", "from x import ", "from ", "import ", "x", "#include", "if ("]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=14).map("".join))
def test_the_linear_code_rule_matches_exactly_what_the_former_one_did(text: str) -> None:
    assert features({"prompt": text}).code == ("```" in text or bool(_OLD_CODE_LINE.search(text)))


#: 1 MiB messages that cost the former rules hours: blank lines, whitespace runs, a brace before them.
PATHOLOGICAL = {"newlines": '"\\n" * N', "crlf": '"\\r\\n" * (N // 2)', "spaces": '" " * N', "tabs and lines": '("\\t" * 1000 + "\\n") * (N // 1001)',
                "brace, blanks": '"{" + " " * (N - 2) + "x"', "semicolons and blanks": '(";" + " \\n" * 500 + "x") * (N // 1002)',
                "from": '"from " + "x" * N', "words": '"ab " * (N // 3)'}  # fmt: skip


def test_the_rules_take_a_pathological_1_mib_message_in_linear_time() -> None:
    """In a child process, under a liveness timeout far above what linear costs (well under a
    second each here) and far below what the former rules took (52 kB of newlines: tens of seconds)."""
    cases = ", ".join(f"({name!r}, {expr})" for name, expr in PATHOLOGICAL.items())
    script = f"""
from zoo_agent.resident.routing import features
N = 1 << 20
for name, text in [{cases}]:
    f = features({{"messages": [{{"role": "user", "content": text[:N]}}]}})
    print(name, f.words, f.code)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == len(PATHOLOGICAL)
