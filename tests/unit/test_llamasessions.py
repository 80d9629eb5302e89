"""A llama.cpp tenant's sessions, kept by its front (issue #33): the pure parts. The whole path, with
a real llama-server and a SIGKILL of the resident, is tests/integration/test_llamacpp_sessions.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from zoo_agent.resident.engines.front import Request, check
from zoo_agent.errors import SessionError
from zoo_agent.resident.engines.llamasessions import LlamaSessions, StreamedTurn, _slot_of, cache_word, dechunker
from zoo_agent.resident.sessions.prompt import rendered_prompt
from zoo_agent.resident.sessions.transcript import SessionTurn


def _post(path: str, body: dict[str, Any], **headers: str) -> Request:
    return Request("POST", path, path, headers, json.dumps(body).encode())


CHAT = {"model": "t", "session": "s1", "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize(("request_", "param"), [
    (_post("/v1/chat/completions", CHAT), None),  # kept by the front
    (Request("GET", "/v1/sessions/s1", "/v1/sessions/s1?model=t"), None),
    (Request("DELETE", "/v1/sessions/s1", "/v1/sessions/s1?model=t"), None),
    (_post("/v1/completions", {"model": "t", "session": "s1", "prompt": "x"}), "session"),  # a session is a chat
    (_post("/v1/chat/completions", CHAT, **{"x-zoo-session-route": "r"}), "session"),  # a route's: its turns span tenants
    (_post("/v1/chat/completions", {**CHAT, "session": 5}), "session"),  # our API's rule: a string
    (_post("/v1/chat/completions", {**CHAT, "model": "t:sql"}), "model"),
])  # fmt: skip
def test_a_front_that_keeps_sessions_takes_a_chat_turn_and_the_session_paths(request_: Request, param: str | None) -> None:
    refused = check(request_, ("t", "m"), sessions=True)
    assert (refused.param if refused is not None else None) == param, refused and refused.message


def test_a_front_without_sessions_still_refuses_them() -> None:
    refused = check(_post("/v1/chat/completions", CHAT), ("t", "m"))
    assert refused is not None and refused.status == 400 and refused.param == "session"
    path = check(Request("GET", "/v1/sessions/s1", "/v1/sessions/s1"), ("t", "m"))
    assert path is not None and path.status == 404


def test_a_chunked_body_is_read_whole_however_it_is_cut() -> None:
    data = [b"x" * 0x214, b"y" * 0xFF, b"z"]
    raw = b"".join(f"{len(d):x};ext=1\r\n".encode() + d + b"\r\n" for d in data) + b"0\r\n\r\n"
    for step in (1, 2, 3, 7, 64, len(raw)):
        reader, out = dechunker(), b""
        for i in range(0, len(raw), step):
            out += reader.feed(raw[i : i + step])
        assert out == b"".join(data) and reader.ended, step


def _event(document: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(document)}\n\n".encode()


def test_a_streamed_turn_passes_its_chunks_and_holds_its_end_until_the_commit() -> None:
    role = _event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}, "finish_reason": None}]})
    pieces = [_event({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}) for text in ("Hel", "lo", " zoo")]
    end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "timings": {"cache_n": 42}}
    usage = _event({"choices": [], "usage": {"prompt_tokens": 50}})
    stream = b"".join([role, *pieces, b": ping\n\n", _event(end), usage, b"data: [DONE]\n\n"])
    turn, sent = StreamedTurn(), []
    for i in range(0, len(stream), 5):  # events cut anywhere
        sent += turn.feed(stream[i : i + 5])
    assert sent == [role, *pieces, b": ping\n\n"]  # nothing of the end before the commit
    assert "".join(turn.text) == "Hello zoo" and turn.finish == "stop" and turn.cached == 42 and turn.done
    ending = turn.ending({"session": {"id": "s"}}).decode()
    events = ending.split("\n\n")
    assert json.loads(events[0].removeprefix("data: ")) == {**end, "x_zoo": {"session": {"id": "s"}}}
    assert events[1:] == [usage.decode().strip(), "data: [DONE]", ""]


def test_a_stream_cut_before_its_end_has_no_finish() -> None:
    turn = StreamedTurn()
    turn.feed(_event({"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}))
    assert turn.finish is None and turn.final is None


def test_how_a_turn_was_continued_is_said_in_the_sessions_words() -> None:
    assert cache_word(history=False, cached_tokens=5) == "none"
    assert cache_word(history=True, cached_tokens=0) == "re-prefilled"
    assert cache_word(history=True, cached_tokens=70) == "cached"
    assert cache_word(history=True, cached_tokens=0, restored=True) == "restored"


class _Words:
    """A tokenizer of one token per word, with a template that writes 'role: content' per message."""

    eos_token_id = None

    def __init__(self) -> None:
        self.rendered = 0

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        self.rendered += 1
        return " ".join(f"{m['role']}: {m['content']}" for m in messages) + " assistant:"

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [len(w) for w in text.split()]}


def _turns(n: int) -> list[SessionTurn]:
    return [SessionTurn.model_validate({"messages": [{"role": "user", "content": f"q{i} a b c"}, {"role": "assistant", "content": f"r{i} d e"}],
                                        "completion_ids": [1]}) for i in range(n)]  # fmt: skip


def test_the_rendered_prompt_keeps_every_turn_that_fits_and_renders_once_when_all_do() -> None:
    words = _Words()
    new = [{"role": "user", "content": "now"}]
    dropped, ids = rendered_prompt(words, _turns(5), new, budget=1000)
    assert dropped == 0 and words.rendered == 1 and len(ids) == 5 * 9 + 3
    for budget in (3, 20, 30, 47, 48):
        dropped, ids = rendered_prompt(_Words(), _turns(5), new, budget)
        assert len(ids) <= budget or dropped == 5, budget
        if dropped:  # the fewest: one turn fewer would not fit
            assert len(rendered_prompt(_Words(), _turns(5)[dropped - 1 :], new, None)[1]) > budget


def test_the_slot_that_served_a_turn_is_read_from_its_verbose_part_and_taken_out() -> None:
    verbose = {"id_slot": 1, "prompt": "the whole conversation", "tokens": []}
    last_piece = {"choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": None}], "__verbose": verbose}
    end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
    turn = StreamedTurn()
    sent = turn.feed(_event(last_piece) + _event(end) + b"data: [DONE]\n\n")
    assert turn.slot == 1 and "".join(turn.text) == "!"
    assert [json.loads(e.decode().removeprefix("data: ")) for e in sent] == [{k: v for k, v in last_piece.items() if k != "__verbose"}]
    whole = {"choices": [], "__verbose": {"id_slot": True}}
    assert _slot_of(whole) is None and "__verbose" not in whole  # not a slot number: none
    assert _slot_of({"__verbose": {"id_slot": 0}}) == 0


def test_a_slot_file_is_named_from_a_valid_session_id_and_its_model_version_only(tmp_path: Path) -> None:
    from zoo_agent.resident.config import WorkerConfig

    def keeper(version: str, cache: str | None = None) -> LlamaSessions:
        config = WorkerConfig(tenant="t", model="m", version=version, version_dir=tmp_path, sessions_dir=tmp_path / "t", kv_cache_type=cache)
        return LlamaSessions(config, str(tmp_path / "engine.sock"))

    name = keeper("v1").slot_file("talk")
    assert name.startswith("talk+") and name.endswith(".bin") and "/" not in name
    others = {keeper("v2").slot_file("talk"), keeper("v1", "q8_0").slot_file("talk"), keeper("v1").slot_file("talk", [{"id": 0, "scale": 1.0}])}
    assert len({name, *others}) == 4  # another version, cache type or adapter never restores it
    assert keeper("v1").slot_file("talk") == name  # the same ones do
    for bad in ("../x", "a/b", "", ".hidden", "x" * 65):
        with pytest.raises(SessionError):
            keeper("v1").slot_file(bad)
