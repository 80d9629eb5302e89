"""Route sessions (issue #21), the parts that decide: the summarizer's validation, what the
summarizer reads, a session file's summaries, and which cache files are a session's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.test_routing import _index
from zoo_agent.errors import SessionDamaged
from zoo_agent.index.checks import semantic_problems
from zoo_agent.resident.sessions import cache_files
from zoo_agent.resident.summaries import condensed, marker_message, summary_message
from zoo_agent.resident.transcript import SessionSummary, SessionTurn, parse_session

ROUTE = {"rules": [{"tenant": "small", "when": {"max_words": 12}}], "default": "large"}


@pytest.mark.parametrize(
    ("summarizer", "pointer", "words"),
    [
        ("nope", "/routes/r/summarizer", "unknown tenant 'nope'"),
        ("other", "/hosts/h/routes/0", "names tenant other, which host h does not serve"),
    ],
)
def test_a_summarizer_must_be_a_tenant_the_host_serves(summarizer: str, pointer: str, words: str) -> None:
    problems = semantic_problems(_index({"r": {**ROUTE, "summarizer": summarizer}}, ["r"]))
    assert any(p.pointer == pointer and words in p.message for p in problems), problems


def test_a_served_summarizer_passes() -> None:
    assert [p for p in semantic_problems(_index({"r": {**ROUTE, "summarizer": "small"}}, ["r"])) if "route" in p.pointer] == []


def _turn(user: str, reply: str, system: str | None = None) -> SessionTurn:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return SessionTurn.model_validate({"messages": messages, "completion_ids": [1, 2]})


def test_the_summarizer_reads_the_previous_summary_then_only_the_turns_after_it() -> None:
    previous = SessionSummary(covers=2, text="They met; Ada likes lions.")
    messages = condensed(previous, [_turn("And tigers?", "Also.", system="Be brief."), _turn("Bye", "Bye!")])
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == "Summary so far: They met; Ada likes lions.\nUser: And tigers?\nAssistant: Also.\nUser: Bye\nAssistant: Bye!"
    assert condensed(None, [_turn("Hi", "Hello")])[1]["content"] == "User: Hi\nAssistant: Hello"


def test_the_prompt_says_what_stands_in_for_the_turns_left_out() -> None:
    assert summary_message(SessionSummary(covers=1, text="x"))["content"] == "Summary of the first 1 turn of this conversation: x"
    assert marker_message(3)["content"].startswith("[The first 3 turns of this conversation are left out")


def _file(summaries: list[dict[str, object]], turns: int = 2) -> bytes:
    doc = {"id": "s", "turns": [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "completion_ids": [1],
                                 "model": "m@1"}] * turns, "summaries": summaries}  # fmt: skip
    return json.dumps(doc).encode()


def test_a_summary_cannot_cover_turns_the_session_does_not_have() -> None:
    assert parse_session(_file([{"covers": 2, "text": "t"}]), "s.json").summaries[0].covers == 2
    with pytest.raises(SessionDamaged, match="covers 3 turns, but the session has 2"):
        parse_session(_file([{"covers": 3, "text": "t"}]), "s.json")
    with pytest.raises(SessionDamaged, match="/summaries/0/covers"):
        parse_session(_file([{"covers": 0, "text": "t"}]), "s.json")


def test_only_the_serving_models_turns_are_checked_against_its_vocabulary() -> None:
    raw = _file([]).replace(b'"completion_ids": [1]', b'"completion_ids": [900]')
    with pytest.raises(SessionDamaged, match="outside the vocabulary"):
        parse_session(raw, "s.json", vocab_size=512)
    assert parse_session(raw, "s.json", vocab_size=512, model="other").turns  # another model's ids are its own


def test_a_sessions_cache_files_are_its_own_and_no_other_sessions(tmp_path: Path) -> None:
    for name in ("s.safetensors", "s+0123abcd.safetensors", "s.b+0123abcd.safetensors", "s.b.safetensors", "s+x.json", "st+1.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in cache_files(tmp_path, "s")] == ["s+0123abcd.safetensors", "s.safetensors"]
    assert cache_files(tmp_path / "missing", "s") == []
