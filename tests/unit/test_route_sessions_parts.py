"""Route sessions (issue #21), the parts that decide: the summarizer's validation, what the
summarizer reads, a session file's summaries, and which cache files are a session's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.routes import routes_index
from zoo_agent.errors import SessionDamaged
from zoo_agent.index.checks import semantic_problems
from zoo_agent.resident.sessions.store import cache_files
from zoo_agent.resident.sessions.summaries import condensed, marker_message, summary_message
from zoo_agent.resident.sessions.transcript import SessionSummary, SessionTurn, parse_session

ROUTE = {"rules": [{"tenant": "small", "when": {"max_words": 12}}], "default": "large"}


@pytest.mark.parametrize(
    ("summarizer", "pointer", "words"),
    [
        ("nope", "/routes/r/summarizer", "unknown tenant 'nope'"),
        ("other", "/hosts/h/routes/0", "names tenant other, which host h does not serve"),
    ],
)
def test_a_summarizer_must_be_a_tenant_the_host_serves(summarizer: str, pointer: str, words: str) -> None:
    problems = semantic_problems(routes_index({"r": {**ROUTE, "summarizer": summarizer}}, ["r"]))
    assert any(p.pointer == pointer and words in p.message for p in problems), problems


def test_a_served_summarizer_passes() -> None:
    assert [p for p in semantic_problems(routes_index({"r": {**ROUTE, "summarizer": "small"}}, ["r"])) if "route" in p.pointer] == []


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


# -- the summarizer's answer is input ------------------------------------------------------------

def _answer(body: bytes, status: int = 200) -> bytes:
    head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    return head.encode() + body


def _chat(content: object, fingerprint: object = "sum@1") -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}], "system_fingerprint": fingerprint}).encode()


UNUSABLE = [
    ("a lone surrogate", _answer(_chat("\ud800 they met"))),
    ("only a lone surrogate", _answer(b'{"choices": [{"message": {"content": "\\udc00"}}]}')),
    ("not text: an object", _answer(_chat({"text": "they met"}))),
    ("not text: a list", _answer(_chat(["they", "met"]))),
    ("not text: a number", _answer(_chat(12))),
    ("not text: null", _answer(_chat(None))),
    ("blank", _answer(_chat(" \n\t "))),
    ("far longer than any summary", _answer(_chat("word " * 200_000))),
    ("deep JSON", _answer(b"[" * 100_000 + b"]" * 100_000)),
    ("not UTF-8", _answer(b'{"choices": [{"message": {"content": "\xff\xfe"}}]}')),
    ("NaN", _answer(b'{"choices": [{"message": {"content": "x"}}], "usage": NaN}')),
    ("no choices", _answer(b'{"choices": []}')),
    ("a 200 that is not JSON", _answer(b"<html>")),
    ("an error", _answer(b'{"error": {"message": "no"}}', 503)),
]


def _summarize_against(tmp_path: Path, answer: bytes, *, trickle: float = 0.0, timeout: float = 30) -> tuple[str, str]:
    """Summarizer.summarize against a unix socket that answers ``answer`` to one request
    (``trickle``: a byte at a time, this many seconds apart)."""
    import asyncio

    from zoo_agent.resident.sessions.summaries import Summarizer

    path = tmp_path / "router.sock"

    async def main() -> tuple[str, str]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            try:
                for piece in [answer[i : i + 1] for i in range(len(answer))] if trickle else [answer]:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(trickle)
            except ConnectionError:
                pass  # the client gave up
            finally:
                writer.close()

        server = await asyncio.start_unix_server(handle, path=str(path))
        async with server:
            return await Summarizer(path, "sum", timeout=timeout).summarize([{"role": "user", "content": "hi"}], 32)

    return asyncio.run(main())


@pytest.mark.parametrize(("name", "answer"), UNUSABLE, ids=[c[0] for c in UNUSABLE])
def test_an_unusable_summary_is_a_failed_one(tmp_path: Path, name: str, answer: bytes) -> None:
    """The session model would refuse it (a lone surrogate made the user's turn a 503): the turns
    are left out with the marker instead, as when the summarizer does not answer."""
    from zoo_agent.resident.sessions.summaries import SummaryFailed

    with pytest.raises(SummaryFailed, match="^summarizer sum: "):
        _summarize_against(tmp_path, answer)


def test_a_usable_summary_is_taken_and_a_strange_fingerprint_is_not(tmp_path: Path) -> None:
    assert _summarize_against(tmp_path, _answer(_chat(" They met. "))) == ("They met.", "sum@1")
    assert _summarize_against(tmp_path, _answer(_chat("They met.", "\ud800"))) == ("They met.", "sum")
    assert _summarize_against(tmp_path, _answer(_chat("They met.", {"a": 1}))) == ("They met.", "sum")


def test_the_turn_gets_the_marker_when_the_summary_is_unusable(tmp_path: Path) -> None:
    """What the worker does with it: a summary without text, so the prompt carries the marker."""
    import asyncio

    from zoo_agent.resident.sessions.summaries import NeedSummary, Summarizer
    from zoo_agent.resident.sessions.turns import summarize

    path = tmp_path / "router.sock"

    async def main() -> SessionSummary:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(_answer(_chat("\ud800")))
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(handle, path=str(path))
        async with server:
            summarizers = {"r": Summarizer(path, "sum", timeout=30)}
            return await summarize(summarizers, "r", NeedSummary(2, [{"role": "user", "content": "hi"}], 32))

    summary = asyncio.run(main())
    assert (summary.covers, summary.text) == (2, "")


def test_a_summary_trickling_in_is_bounded_as_a_whole(tmp_path: Path) -> None:
    """Each byte comes within the read timeout; the exchange as a whole is what is bounded."""
    from zoo_agent.resident.sessions.summaries import SummaryFailed

    with pytest.raises(SummaryFailed, match="no whole answer within 1s"):
        _summarize_against(tmp_path, _answer(_chat("They met. " * 20)), trickle=0.1, timeout=1)
