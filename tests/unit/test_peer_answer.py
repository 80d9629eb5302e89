"""What a peer's answer may be (issue #31), pure: literal hostile answers, then hypothesis
feeding random bytes and random deep or wide JSON, whole and as events split anywhere. Every
outcome is either bytes we would send (one JSON object per answer or event, ``x_zoo`` on the
last chunk) or a ``Refused`` (a failed attempt, the next peer's turn), never another exception."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoo_agent.resident.router.peer_answer import PASSED_ON, RELAYED_ERRORS, Events, Refused, error_message, head, judge, whole

X_ZOO = {"host": "b"}
DEEP = b"[" * 100_000 + b"]" * 100_000


def _chunk(content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta = {"content": content} if content is not None else {"role": "assistant"}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _event(document: Any) -> bytes:
    return b"data: " + json.dumps(document).encode() + b"\n\n"


@pytest.mark.parametrize(
    ("status", "content_type", "stream", "expected"),
    [
        (200, "application/json", False, "answer"),
        (200, "text/event-stream; charset=utf-8", True, "answer"),
        (400, "application/json", True, "error"),  # a stream's error comes whole
        (404, "application/json", False, "error"),
        (413, "application/json", False, "error"),
        (422, "application/json", False, "error"),
    ],
)
def test_what_may_be_relayed(status: int, content_type: str, stream: bool, expected: str) -> None:
    assert judge(status, content_type, stream) == expected


@pytest.mark.parametrize(
    ("status", "content_type", "stream"),
    [
        *((s, "application/json", False) for s in (100, 101, 103, 201, 202, 204, 206, 301, 302, 303, 307, 308, 401, 403, 405, 418, 429, 500, 502, 503)),
        (200, "text/event-stream", False),  # not what was asked for
        (200, "application/json", True),
        (200, "text/html", False),
        (200, "", False),
        (404, "text/html", False),
    ],
)
def test_everything_else_is_a_failed_attempt(status: int, content_type: str, stream: bool) -> None:
    with pytest.raises(Refused, match=str(status)):
        judge(status, content_type, stream)


def test_the_statuses_passed_on_are_not_relayed() -> None:
    assert not PASSED_ON & RELAYED_ERRORS and 404 in RELAYED_ERRORS  # a 404 for a declared adapter is the answer


def test_our_head_never_the_peers() -> None:
    assert head(False) == [(b"content-type", b"application/json")]
    assert dict(head(True))[b"content-type"] == b"text/event-stream"


def test_a_whole_answer_is_rewritten_with_x_zoo() -> None:
    answer = {"id": "x", "choices": [{"message": {"content": "hi"}}], "x_zoo": {"route": {"route": "r"}, "host": "forged", "model": "m@v1"}}
    out = json.loads(whole(200, json.dumps(answer).encode(), X_ZOO))
    # The peer's model stays; who answered and which route chose are ours to say (a forged route is dropped).
    assert out["choices"] == answer["choices"] and out["x_zoo"] == {"model": "m@v1", "host": "b"}
    error = json.loads(whole(404, b'{"error": {"message": "no such adapter", "code": "model_not_found"}}', X_ZOO))
    assert error["error"]["message"] == "no such adapter" and error["x_zoo"] == X_ZOO


@pytest.mark.parametrize(
    ("status", "data", "says"),
    [
        (200, DEEP, "nests deeper"),
        (200, b'{"a":' * 100_000, "nests deeper"),
        (200, b'{"choices": [], "n": NaN}', "NaN"),
        (200, b"\xff{}", "not UTF-8"),
        (200, b"[1, 2]", "not a JSON object"),
        (200, b'{"hello": 1}', "no completion"),
        (200, b"", "not JSON"),
        (404, b'{"error": "nope"}', "no error message"),
        (400, b'{"detail": "x"}', "no error message"),
    ],
)
def test_a_malformed_whole_answer_is_refused(status: int, data: bytes, says: str) -> None:
    with pytest.raises(Refused, match=says):
        whole(status, data, X_ZOO)


def test_an_error_message_for_our_503_is_short_printable_or_empty() -> None:
    assert error_message(b'{"error": {"message": "boom"}}') == "boom"
    assert error_message(b'{"error": {"message": "a\\nb\\u0000c' + b"x" * 1000 + b'"}}') == "a b c" + "x" * 195
    for data in (DEEP, b"\xff", b"[]", b'{"error": 1}', b"{}"):
        assert error_message(data) == ""


def test_a_relayed_error_message_is_cut_to_200_printable_characters() -> None:
    """A peer's 4xx (and the error event that ends its stream) reaches our client with its message on one
    short line, as our 503 gets it: 10 kB of it, or a terminal's escape codes, are the peer's to keep."""
    long = '{"error": {"message": "a\\nb\\u001b[2Jc' + "x" * 10_000 + '", "code": "too_long", "param": "messages"}}'
    error = json.loads(whole(400, long.encode(), X_ZOO))["error"]
    assert error == {"message": "a b [2Jc" + "x" * 192, "code": "too_long", "param": "messages"}
    out, ok = _feed([_event(_chunk("a")), b"data: " + long.encode() + b"\n\n", b"data: [DONE]\n\n"])
    assert ok and json.loads(out[1][6:])["error"]["message"] == "a b [2Jc" + "x" * 192


def _feed(chunks: list[bytes]) -> tuple[list[bytes], bool]:
    """Every event that may be sent (those checked before a refusal too), and whether the stream ended cleanly."""
    events, out = Events(X_ZOO, limit=1 << 16), []
    try:
        for c in chunks:
            out += events.feed(c)
        events.end()
    except Refused as exc:
        return out + exc.ready, False
    return out, True


def test_events_are_held_until_the_first_token_and_the_last_chunk_says_who_answered() -> None:
    events = Events(X_ZOO, limit=1 << 16)
    assert events.feed(b": waiting for big: loading\n\n" + _event(_chunk())) == []  # a comment, dropped; the role chunk held
    assert not events.committed
    sent = events.feed(_event(_chunk("Hi")) + _event(_chunk(" there", "length"))[:10])
    assert events.committed and [json.loads(e[6:]) for e in sent] == [_chunk(), _chunk("Hi")]
    sent = events.feed(_event(_chunk(" there", "length"))[10:] + b"data: [DONE]\n\n")
    assert json.loads(sent[0][6:])["x_zoo"] == X_ZOO and sent[1] == b"data: [DONE]\n\n"
    events.end()


@pytest.mark.parametrize(
    "stream",
    [
        b": hi\rdata: " + json.dumps(_chunk("x", "stop")).encode() + b"\n\n",  # a CR ends a line for an SSE client
        b"event: other\ndata: {}\n\n",
        b"id: 1\n\n",
        b"retry: 1\n\n",
        b"data: " + json.dumps(_chunk("a")).encode() + b"\ndata: more\n\n",
        b"data:" + json.dumps(_chunk("a")).encode() + b"\n\n",
        b"data: " + DEEP + b"\n\n",
        b"data: {\"choices\": 5}\n\n",
        b"data: [1]\n\n",
        b"data: " + json.dumps(_chunk("a")).encode(),  # cut inside an event
        b"data: " + json.dumps(_chunk()).encode() + b"\n\n",  # ended before a first token
        b"x" * ((1 << 16) + 1),
    ],
)
def test_an_event_not_ours_to_relay_is_refused(stream: bytes) -> None:
    assert _feed([stream]) == ([], False)


def test_nothing_after_done_is_read() -> None:
    out, ok = _feed([_event(_chunk("a", "stop")) + b"data: [DONE]\n\ndata: " + DEEP[:50], b"\r\nevent: x\n\n"])
    assert ok and out[-1] == b"data: [DONE]\n\n" and len(out) == 2


def test_what_waits_for_the_first_token_is_bounded() -> None:
    """A peer sending role chunks forever, never a token: refused once they pass the limit, not held without end."""
    events = Events(X_ZOO, limit=1 << 12)
    with pytest.raises(Refused, match="before a first token"):
        for _ in range(1000):
            events.feed(_event(_chunk()))


def test_an_error_event_is_a_failed_attempt_before_the_first_token_and_relayed_after() -> None:
    error = b'data: {"error": {"message": "tenant big did not load", "code": 503}}\n\n'
    events = Events(X_ZOO, limit=1 << 16)
    with pytest.raises(Refused, match="before a first token: tenant big did not load"):
        events.feed(b": waiting for big: loading\n\n" + _event(_chunk()) + error)
    out, ok = _feed([_event(_chunk("a")), error, b"data: [DONE]\n\n"])
    assert ok and json.loads(out[1][6:])["error"]["code"] == 503


def test_an_error_event_after_the_first_token_says_who_gave_it() -> None:
    """A route's or a peer's answer names who gave it, errors too: the error event that ends a stream carries ``x_zoo``."""
    error = b'data: {"error": {"message": "the device went away", "code": 500}, "x_zoo": {"tenant": "big"}}\n\n'
    out, ok = _feed([_event(_chunk("a")), error, b"data: [DONE]\n\n"])
    assert ok and json.loads(out[1][6:])["x_zoo"] == {"tenant": "big", **X_ZOO}


def test_a_large_stream_of_small_chunks_is_searched_once() -> None:
    """A separator is looked for only in what arrived since: one byte at a time stays linear (a peer trickling)."""
    event = _event(_chunk("x" * 2000, "length"))
    out, ok = _feed([event[i : i + 1] for i in range(len(event))] + [b"data: [DONE]\n\n"])
    assert ok and len(out) == 2


# -- hypothesis -------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=60,
)


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    """Random JSON, sometimes wrapped hundreds of thousands deep, sometimes shaped like an answer."""
    document = draw(JSON)
    if draw(st.booleans()):
        document = {"choices": draw(st.lists(st.fixed_dictionaries({"delta": st.fixed_dictionaries({"content": st.text(max_size=5)}),
                                                                     "finish_reason": st.none() | st.just("stop")}), max_size=3)),
                    "extra": document}  # fmt: skip
    data = json.dumps(document).encode()
    depth = draw(st.sampled_from([0, 0, 1, 63, 64, 65, 1000, 100_000]))
    return b"[" * depth + data + b"]" * depth


def _well_formed_event(event: bytes) -> None:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    line = event[6:-2]
    assert b"\n" not in line and b"\r" not in line
    assert line == b"[DONE]" or isinstance(json.loads(line), dict)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(status=st.sampled_from([200, 400, 404, 413, 422]), data=st.one_of(st.binary(max_size=300), documents()))
def test_any_whole_answer_is_relayed_well_formed_or_refused(status: int, data: bytes) -> None:
    try:
        out = whole(status, data, X_ZOO)
    except Refused as exc:
        assert "\n" not in str(exc)
        return
    document = json.loads(out)
    assert isinstance(document, dict) and document["x_zoo"] == X_ZOO and b"\n" not in out


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """Random events (answers, comments, random bytes, deep JSON) joined by blank lines, sometimes not."""
    parts = draw(st.lists(st.one_of(documents().map(lambda d: b"data: " + d), st.binary(max_size=40), st.just(b"data: [DONE]"),
                                    st.just(b": waiting"), st.just(b"data: " + json.dumps(_chunk("t")).encode())), max_size=8))  # fmt: skip
    separator = draw(st.sampled_from([b"\n\n", b"\n\n", b"\r\n\r\n", b"\n"]))
    return separator.join(parts) + draw(st.sampled_from([b"", b"\n\n"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams(), cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=6))
def test_any_stream_is_relayed_well_formed_or_refused_wherever_it_is_cut(stream: bytes, cuts: list[int]) -> None:
    at = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in zip(at, at[1:])]
    out, ok = _feed(chunks)
    for event in out:
        _well_formed_event(event)
    assert (out, ok) == _feed([stream])  # how the bytes were cut changes nothing


def test_a_stream_cut_off_after_its_first_token_is_no_whole_answer() -> None:
    """A peer that sends two chunks and closes looked like a complete answer: 200, a clean end,
    no error event and no [DONE] (issue #31, adversarial pass B3). It ends in the 502 error event now."""
    events = Events(X_ZOO, limit=1 << 16)
    sent = events.feed(_event(_chunk()) + _event(_chunk("Hi")))
    assert events.committed and len(sent) == 2
    with pytest.raises(Refused, match=r"ended before data: \[DONE\]"):
        events.end()
