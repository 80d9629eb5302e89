"""A conversation that moves between models through a route (issue #21): every committed turn
in the new model's prompt, in that model's own template and tokenizer; the model it left
restores its cache on return; what does not fit a small model is summarized by the route's
summarizer (kept, reused) or left out with a marker.

Real processes: the resident with its router, one worker per tenant, tiny models with
different tokenizers, chat templates and contexts, built here and published with apply.
Each check compares the session's answer with a stateless request carrying exactly the
messages the prompt should hold (greedy, a fixed number of tokens): equal answers and equal
prompt token counts mean the same prompt ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.resident import Resident
from tests.support.world import World

pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")

pytestmark = pytest.mark.resident

#: The second model writes its conversations otherwise than the first.
OTHER_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
RULES = [{"tenant": "large", "when": {"keywords": ["deep"]}}]
GEN = {"generation": {"temperature": 0, "max_tokens": 6}}


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """The second model twice: with a large context, and with one a long session does not fit."""
    from zoo_agent.demo.tiny import build_tiny_model

    base = tmp_path_factory.mktemp("other")
    wide = build_tiny_model(base / "wide", seed=7, vocab=400, chat_template=OTHER_TEMPLATE)
    narrow = build_tiny_model(base / "narrow", seed=7, vocab=400, chat_template=OTHER_TEMPLATE, context=200)
    return _files(wide), _files(narrow)


def _world(world: World, tiny: dict[str, bytes], large: dict[str, bytes]) -> World:
    world.artifact("m", "v1", tiny)
    world.artifact("m2", "v1", large)
    routes = {"assistant": {"rules": RULES, "default": "small", "summarizer": "small"},
              "plain": {"rules": RULES, "default": "small"}}  # fmt: skip
    doc = {"models": world.models, "loras": {},
           "tenants": {"small": {"model": "m", **GEN, "pinned": True}, "large": {"model": "m2", **GEN, "pinned": True}},
           "routes": routes, "hosts": {"h": {"tenants": ["small", "large"], "routes": ["assistant", "plain"]}}}  # fmt: skip
    world.index.write_text(json.dumps(doc, indent=2))
    assert world.run("apply").exit_code == 0
    return world


def _ask(r: Resident, model: str, messages: list[dict[str, str]], session: str | None = None,
         headers: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    import httpx

    body: dict[str, Any] = {"model": model, "messages": messages, "ignore_eos": True, **({"session": session} if session else {})}
    resp = httpx.post(r.url + "/v1/chat/completions", json=body, headers=headers, timeout=180)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def _text(answer: dict[str, Any]) -> str:
    return str(answer["choices"][0]["message"]["content"])


def _transcript(world: World, route: str, sid: str) -> dict[str, Any]:
    return dict(json.loads((world.root / "resident" / "routes" / route / "sessions" / f"{sid}.json").read_text()))


def _same(session_answer: dict[str, Any], stateless: dict[str, Any]) -> None:
    assert _text(session_answer) == _text(stateless)
    assert session_answer["usage"]["prompt_tokens"] == stateless["usage"]["prompt_tokens"]


def test_a_session_moves_to_another_model_and_back_keeping_every_turn(world: World, tiny: dict[str, bytes],
                                                                     other: tuple[dict[str, bytes], dict[str, bytes]]) -> None:  # fmt: skip
    import httpx

    w = _world(world, tiny, other[0])
    r = Resident(w)
    try:
        r.notify.wait(lambda m: "READY" in m, timeout=120)
        history: list[dict[str, str]] = []

        def say(text: str) -> dict[str, Any]:
            answer = _ask(r, "assistant", [{"role": "user", "content": text}], session="conv")
            history.extend([{"role": "user", "content": text}, {"role": "assistant", "content": _text(answer)}])
            return answer

        first, second = say("Hello there"), say("Tell me about the zoo")
        assert [a["model"] for a in (first, second)] == ["small", "small"]
        assert second["x_zoo"]["session"]["cache"] == "restored"
        moved_to = [*history, {"role": "user", "content": "Think deep about the lions"}]
        moved = say("Think deep about the lions")
        assert moved["model"] == "large" and moved["x_zoo"]["route"]["tenant"] == "large"
        session = moved["x_zoo"]["session"]
        assert (session["route"], session["cache"], session["dropped_turns"], session["summary"]) == ("assistant", "re-prefilled", 0, "none")
        _same(moved, _ask(r, "large", moved_to))  # both turns of the first model, in the second's template and tokens

        back = say("Back to the zoo")  # the first model's cache covers its own two turns: restored, not prefilled again
        assert back["model"] == "small"
        assert back["x_zoo"]["session"]["cache"] == "restored" and back["x_zoo"]["session"]["cached_tokens"] >= second["usage"]["prompt_tokens"]

        turns = _transcript(w, "assistant", "conv")["turns"]
        assert [t["model"] for t in turns] == ["m@v1", "m@v1", "m2@v1", "m@v1"]
        assert [m["content"] for t in turns for m in t["messages"]] == [m["content"] for m in history]
        caches = sorted(p.name for p in (w.root / "resident/routes/assistant/kv-cache").iterdir())
        assert len(caches) == 2 and all(c.startswith("conv+") for c in caches)  # one per model

        # The route's session is not the tenant's, and a client cannot claim a route's header.
        alone = _ask(r, "small", [{"role": "user", "content": "Hello there"}], session="conv", headers={"X-Zoo-Session-Route": "assistant"})
        assert "route" not in alone["x_zoo"]["session"] and alone["x_zoo"]["session"]["cache"] == "none"
        assert len(_transcript(w, "assistant", "conv")["turns"]) == 4
        got = httpx.get(r.url + "/v1/sessions/conv", params={"model": "assistant"}, timeout=10)
        assert got.status_code == 200 and len(got.json()["turns"]) == 4
        gone = httpx.delete(r.url + "/v1/sessions/conv", params={"model": "assistant"}, timeout=10)
        assert gone.status_code == 200
        assert not list((w.root / "resident/routes/assistant/kv-cache").iterdir())
        assert httpx.get(r.url + "/v1/sessions/conv", params={"model": "assistant"}, timeout=10).status_code == 404
        cli = w.raw("sessions", "list", *w.args("--route", "assistant", "--json"))
        assert cli.exit_code == 0 and json.loads(cli.output)["sessions"] == []
    finally:
        r.stop()


LONG = " ".join(["The zoo keeps every model pinned by its digest."] * 6)


def test_turns_that_do_not_fit_are_summarized_once_and_the_summary_reused(world: World, tiny: dict[str, bytes],
                                                                         other: tuple[dict[str, bytes], dict[str, bytes]]) -> None:  # fmt: skip
    w = _world(world, tiny, other[1])  # the second model's context: 200 tokens
    r = Resident(w)
    try:
        r.notify.wait(lambda m: "READY" in m, timeout=120)
        for route in ("assistant", "plain"):
            for _ in range(3):
                _ask(r, route, [{"role": "user", "content": LONG}], session="long")
        moved = _ask(r, "assistant", [{"role": "user", "content": "Think deep"}], session="long")
        session = moved["x_zoo"]["session"]
        assert moved["model"] == "large" and session["summary"] == "new" and session["dropped_turns"] >= 1
        document = _transcript(w, "assistant", "long")
        summaries, turns = document["summaries"], document["turns"]
        assert len(summaries) == 1 and summaries[0]["covers"] == session["dropped_turns"] and summaries[0]["model"] == "m@v1"
        assert len(turns) == 4  # the summarized turns stay in the file
        # The summary stands in for exactly the turns it covers: the same prompt, asked statelessly.
        covers = summaries[0]["covers"]
        summary = {"role": "system", "content": f"Summary of the first {covers} turn{'s' if covers != 1 else ''} of this conversation: "
                                                f"{summaries[0]['text']}"}  # fmt: skip
        _same(moved, _ask(r, "large", [summary, *[m for t in turns[covers:3] for m in t["messages"]], {"role": "user", "content": "Think deep"}]))

        again = _ask(r, "assistant", [{"role": "user", "content": "Think deep again"}], session="long")
        assert again["x_zoo"]["session"]["summary"] == "reused" and again["x_zoo"]["session"]["dropped_turns"] == covers
        assert len(_transcript(w, "assistant", "long")["summaries"]) == 1

        # A route with no summarizer leaves them out, and says so in the prompt.
        plain = _ask(r, "plain", [{"role": "user", "content": "Think deep"}], session="long")
        left = plain["x_zoo"]["session"]["dropped_turns"]
        assert plain["x_zoo"]["session"]["summary"] == "marker" and left >= 1
        plain_turns = _transcript(w, "plain", "long")["turns"]
        marker = {"role": "system", "content": f"[The first {left} turn{'s' if left != 1 else ''} of this conversation are left out: "
                                               "they do not fit this model's context.]"}  # fmt: skip
        _same(plain, _ask(r, "large", [marker, *[m for t in plain_turns[left:3] for m in t["messages"]], {"role": "user", "content": "Think deep"}]))
        assert "summaries" not in _transcript(w, "plain", "long")
    finally:
        r.stop()


def test_chat_holds_a_session_through_a_route(world: World, tiny: dict[str, bytes], other: tuple[dict[str, bytes], dict[str, bytes]]) -> None:
    """`zoo-agent chat --model ROUTE` (issue #36): the route is listed, its session moves between models and resumes."""
    from click.testing import CliRunner

    from zoo_agent.cli.main import cli

    w = _world(world, tiny, other[0])
    r = Resident(w)
    try:
        r.notify.wait(lambda m: "READY" in m, timeout=120)
        chat = ["chat", "--url", r.url, "--model", "assistant", "--session", "walk"]
        first = CliRunner().invoke(cli, chat, input="Hello there\nThink deep about the lions\n/quit\n")
        assert first.exit_code == 0, first.output
        assert "new session walk with assistant (a route over large, small)" in first.stdout
        assert "[m@v1 · small by default · session walk · cache none]" in first.stdout
        assert "[m2@v1 · large by keywords:deep · session walk · cache re-prefilled]" in first.stdout
        assert "resume with: zoo-agent chat --session walk --model assistant" in first.stdout
        again = CliRunner().invoke(cli, chat, input="Back to the zoo\n/quit\n")
        assert again.exit_code == 0, again.output
        assert "resuming session walk (2 turns) with assistant" in again.stdout
        assert "[m@v1 · small by default · session walk · cache restored]" in again.stdout
        turns = _transcript(w, "assistant", "walk")["turns"]
        assert [t["model"] for t in turns] == ["m@v1", "m2@v1", "m@v1"]
        assert not (w.root / "resident/tenants/small/sessions/walk.json").exists()  # the route's session, not a tenant's
    finally:
        r.stop()
