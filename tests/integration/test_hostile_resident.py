"""Hostile input and faults against the resident and the sessions (issue #17): nothing
escapes the zoo, nothing is silently wrong, nothing takes the worker down."""

from __future__ import annotations

import json
import os
import select
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.asgi import CHAT, ask
from tests.support.victim import make_victim, snapshot
from tests.support.world import World

pytestmark = pytest.mark.resident


def _session(sid: str, turns: int = 1) -> dict[str, Any]:
    """A session file as the resident writes it."""
    turn = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}], "completion_ids": [5, 6, 7],
            "template": "0123456789abcdef", "model": "m@v1", "dropped_turns": 0, "time": "2025-01-01T00:00:00Z",
            "sampling": {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None},
            "adapter": None, "finish_reason": "length", "cache": "none"}  # fmt: skip
    return {"id": sid, "created": "2025-01-01T00:00:00Z", "updated": "2025-01-01T00:00:00Z", "turns": [dict(turn) for _ in range(turns)]}


KEY = "s3cret-t0ken"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _one_line_error(result: Any) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output + result.stderr
    return str(lines[0])


# -- 1. --tenant is an id, never a path ------------------------------------------------------


def test_a_tenant_that_is_a_path_is_refused_and_nothing_outside_the_zoo_changes(world: World, tmp_path: Path) -> None:
    world.artifact("m", "v1", {"config.json": b"{}"})
    victim = make_victim(tmp_path / "victim")
    (victim / "sessions").mkdir()
    (victim / "sessions" / "precious.json").write_text(json.dumps(_session("precious")))
    (victim / "kv-cache").mkdir()
    (victim / "kv-cache" / "precious.safetensors").write_bytes(b"the user's own bytes")
    before = snapshot(victim)
    upload = tmp_path / "upload.json"
    upload.write_text(json.dumps(_session("precious")))
    tenants_dir = world.root / "resident" / "tenants"
    attacks = [str(victim), os.path.relpath(victim, tenants_dir), "../../../victim", "t/../../../../victim", "T", "", " t", "t\n", "a/b"]
    for tenant in attacks:
        for command in (["import", "--force", str(upload)], ["list"], ["show", "precious"], ["export", "precious"], ["prune"]):
            result = world.raw("sessions", command[0], *world.args("--tenant", tenant, *command[1:]))
            assert result.exit_code == 2, (tenant, command, result.output)
            assert "not a tenant id" in _one_line_error(result), (tenant, command)
    unknown = world.raw("sessions", "list", *world.args("--tenant", "nobody"))
    assert unknown.exit_code == 2 and _one_line_error(unknown).endswith("no such tenant in " + str(world.index) + " (tenants: t)")
    assert snapshot(victim) == before
    assert not (world.root / "resident").exists()  # nothing was created in the zoo either


def test_a_route_that_is_a_path_is_refused_and_nothing_outside_the_zoo_changes(world: World, tmp_path: Path) -> None:
    """The same for a route's sessions (issue #21): `--route` becomes a path component too."""
    world.artifact("m", "v1", {"config.json": b"{}"})
    doc = json.loads(world.index.read_text())
    doc["routes"] = {"r": {"default": "t"}}
    world.index.write_text(json.dumps(doc))
    victim = make_victim(tmp_path / "victim")
    (victim / "sessions").mkdir()
    (victim / "sessions" / "precious.json").write_text(json.dumps(_session("precious")))
    before = snapshot(victim)
    upload = tmp_path / "upload.json"
    upload.write_text(json.dumps(_session("precious")))
    routes_dir = world.root / "resident" / "routes"
    for route in [str(victim), os.path.relpath(victim, routes_dir), "../../../victim", "r/../../../../victim", "R", "", "r\n", "a/b"]:
        for command in (["import", "--force", str(upload)], ["list"], ["show", "precious"], ["export", "precious"], ["prune"]):
            result = world.raw("sessions", command[0], *world.args("--route", route, *command[1:]))
            assert result.exit_code == 2, (route, command, result.output)
            assert "not a route id" in _one_line_error(result), (route, command)
    unknown = world.raw("sessions", "list", *world.args("--route", "nobody"))
    assert unknown.exit_code == 2 and _one_line_error(unknown).endswith("no such route in " + str(world.index) + " (routes: r)")
    assert snapshot(victim) == before
    assert not (world.root / "resident").exists()


# -- 2. session files are validated: refused at import, reported and skipped on disk ---------

BROKEN_TURNS: list[tuple[Any, str, str]] = [
    ("not a turn", "/turns/0", "valid dictionary"),
    ({"messages": "hello", "completion_ids": [1]}, "/turns/0/messages", "valid list"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}, "/turns/0/completion_ids", "Field required"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "completion_ids": [3, 9999]},
     "/turns/0/completion_ids/1", "outside the vocabulary (512 ids)"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "completion_ids": [-1]},
     "/turns/0/completion_ids/0", "greater than or equal to 0"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 5}], "completion_ids": [1]},
     "/turns/0/messages/1/content", "valid string"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Yo"}], "completion_ids": [1]},
     "/turns/0/messages", "role 'assistant'"),
    ({"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "Yo"}], "completion_ids": [1]},
     "/turns/0/messages/0/content", "lone surrogate"),
]  # fmt: skip


def _zoo_with_vocab(world: World) -> None:
    world.artifact("m", "v1", {"config.json": json.dumps({"vocab_size": 512}).encode()})
    assert world.run("apply").exit_code == 0


@pytest.mark.parametrize(("bad_turn", "where", "why"), BROKEN_TURNS, ids=[b[1] + ":" + b[2] for b in BROKEN_TURNS])
def test_import_refuses_a_damaged_session_in_one_line_naming_file_and_pointer(world: World, tmp_path: Path, bad_turn: Any, where: str, why: str) -> None:
    _zoo_with_vocab(world)
    upload = tmp_path / "upload.json"
    upload.write_text(json.dumps({**_session("s"), "turns": [_session("s")["turns"][0], bad_turn]}))
    result = world.raw("sessions", "import", *world.args(str(upload)))
    assert result.exit_code == 2, result.output
    line = _one_line_error(result)
    assert line.startswith(f"{upload}: {where.replace('/turns/0', '/turns/1')}: ") and why in line, line
    assert not (world.root / "resident/tenants/t/sessions").exists()


def test_import_refuses_what_is_not_a_session_file(world: World, tmp_path: Path) -> None:
    _zoo_with_vocab(world)
    cases = {b"\xff\xfe{}": "is not UTF-8", b"[1, 2]": "valid dictionary", b'{"id": "s", "turns": [], "extra": 1}': "/extra: Extra inputs",
             b'{"id": "../x", "turns": []}': "/id: String should match", b'{"id": "s", "turns": [], "created": NaN}': "NaN is not valid JSON",
             b"[" * 100_000: "not JSON"}  # fmt: skip
    for raw, why in cases.items():
        (tmp_path / "upload.json").write_bytes(raw)
        result = world.raw("sessions", "import", *world.args(str(tmp_path / "upload.json")))
        assert result.exit_code == 2 and why in _one_line_error(result), (raw[:20], result.output, result.stderr)


def test_a_damaged_session_on_disk_is_listed_as_damaged_and_the_others_still_list(world: World, tmp_path: Path) -> None:
    _zoo_with_vocab(world)
    sessions = world.root / "resident/tenants/t/sessions"
    sessions.mkdir(parents=True)
    (sessions / "good.json").write_text(json.dumps(_session("good")))
    (sessions / "bad.json").write_text(json.dumps({**_session("bad"), "turns": ["nope"]}))
    (sessions / "liar.json").write_text(json.dumps(_session("../../../victim")))  # an id that is a path: never used as one
    (sessions / "other.json").write_text(json.dumps(_session("good")))  # another session's id: not this file's
    listed = world.raw("sessions", "list", "--json", *world.args())
    assert listed.exit_code == 0, listed.output
    document = json.loads(listed.stdout)
    assert [s["id"] for s in document["sessions"]] == ["good"]
    assert sorted(Path(d["file"]).name for d in document["damaged"]) == ["bad.json", "liar.json", "other.json"]
    assert "/turns/0: Input should be a valid dictionary" in " ".join(d["error"] for d in document["damaged"])
    assert "skipped" in listed.stderr  # logged
    human = world.raw("sessions", "list", *world.args())
    assert human.exit_code == 0 and "bad                      damaged (skipped):" in human.stdout
    pruned = world.raw("sessions", "prune", "--json", *world.args())
    assert pruned.exit_code == 0 and len(json.loads(pruned.stdout)["damaged"]) == 3
    shown = world.raw("sessions", "show", "bad", *world.args())
    assert shown.exit_code == 2 and "/turns/0" in _one_line_error(shown)


def test_a_damaged_session_fails_only_its_own_requests_with_a_4xx_naming_it(model_dir: Path, tmp_path: Path) -> None:
    from tests.support.sessions import backend, talk, turn

    b = backend(model_dir, tmp_path)
    assert talk(b, [turn("Hello", session="good")])[0][0] == 200
    sessions = tmp_path / "sessions"
    for sid, turns in {"not-a-turn": ["x"], "no-ids": [{"messages": []}], "vocab": [{**_session("v")["turns"][0], "completion_ids": [10**6]}],
                       "not-json": None}.items():  # fmt: skip
        (sessions / f"{sid}.json").write_text("{" if turns is None else json.dumps({**_session(sid), "turns": turns}))
        results = talk(b, [turn("Hi", session=sid), {"_method": "GET", "_path": f"/v1/sessions/{sid}"}, turn("Hi again", session="good"),
                           {"_method": "DELETE", "_path": f"/v1/sessions/{sid}"}, turn("Hi", session=sid)])  # fmt: skip
        for status, body in results[:2]:
            assert status == 422 and body["error"]["code"] == "session_damaged" and body["error"]["param"] == "session", (sid, body)
            assert f"session '{sid}' is damaged" in body["error"]["message"]
        assert results[2][0] == 200 and results[2][1]["x_zoo"]["session"]["cache"] == "restored"  # the others go on
        assert results[3][0] == 200  # deleting is how a damaged session is repaired
        assert results[4][0] == 200 and results[4][1]["x_zoo"]["session"]["cache"] == "none"  # and then it starts afresh


# -- 3. a KV cache whose tensor bytes were damaged is never used ----------------------------


def _flip_tensor_byte(path: Path, name: str) -> None:
    """One flipped byte inside a tensor's data: the header stays valid, safetensors loads it."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8 : 8 + header_len])[name]["data_offsets"]
    data[8 + header_len + (start + end) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_cache_with_damaged_tensor_bytes_is_refused_counted_and_re_prefilled(model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from tests.support.sessions import backend, reply, talk, turn

    talk(backend(model_dir, tmp_path / "a"), [turn("Hello there")])
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    kv = tmp_path / "b" / "kv-cache" / "s.safetensors"
    _flip_tensor_byte(kv, "v1")
    clean = talk(backend(model_dir, tmp_path / "a"), [turn("Tell me about the zoo")])
    damaged = talk(backend(model_dir, tmp_path / "b"), [turn("Tell me about the zoo")])
    assert clean[0][1]["x_zoo"]["session"]["cache"] == "restored"
    assert damaged[0][1]["x_zoo"]["session"]["cache"] == "re-prefilled"
    assert reply(damaged[0]) == reply(clean[0])  # the same answer as from the intact cache
    assert "zoo:session_cache_corrupt_total 1.0" in damaged[1][1]


# -- a real resident (uvicorn, h11, real sockets) shared by the HTTP tests ----------------------


@pytest.fixture(scope="module")
def served(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.support.resident import Resident

    world = World(tmp_path_factory.mktemp("served"))
    world.artifact("m", "v1", {p.name: p.read_bytes() for p in sorted(model_dir.iterdir())})
    world.tenant = {"generation": {"temperature": 0, "max_tokens": 8}}
    world.write_index()
    assert world.run("apply").exit_code == 0
    (world.tmp / "api-key").write_text(KEY + "\n")
    r = Resident(world, "--api-key-file", str(world.tmp / "api-key"))
    try:
        r.notify.wait(lambda m: "READY" in m, timeout=120)
        yield r
    finally:
        r.stop()


def _raw(port: int, head: bytes, chunks: Iterator[bytes] = iter(())) -> tuple[int, dict[str, str], bytes]:
    """One request over a plain socket (framing httpx would not send); the response is read
    while the body is still going out, as a server may answer before the body ends."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head)
        for chunk in chunks:
            if select.select([s], [], [], 0)[0]:
                break  # answered already
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        data = b""
        while b"\r\n\r\n" not in data:
            piece = s.recv(65536)
            assert piece, data
            data += piece
        top, _, body = data.partition(b"\r\n\r\n")
        status_line, *header_lines = top.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
        while len(body) < int(headers.get("content-length", "0")):
            piece = s.recv(65536)
            if not piece:
                break
            body += piece
    return int(status_line.split()[1]), headers, body


def _head(method: str, path: str, *extra: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {KEY}", "Content-Type: application/json", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


# -- 4. the body limit holds for the bytes read, whatever the framing ----------------------------


def test_a_chunked_body_past_the_limit_is_413_and_never_held_in_memory(served: Any) -> None:
    pid = served.worker_pid()
    peak = _peak_rss(pid)
    chunk = 64 << 10
    payload = (f"{chunk:x}\r\n".encode() + b" " * chunk + b"\r\n" for _ in range((5 << 20) // chunk))  # 5 MB, no Content-Length
    status, headers, body = _raw(served.port, _head("POST", "/v1/completions", "Transfer-Encoding: chunked"), payload)
    assert status == 413 and json.loads(body)["error"]["param"] == "body", body
    assert _peak_rss(pid) - peak < 64 << 20  # it grew by 1.5 GB when only Content-Length was checked
    declared = _raw(served.port, _head("POST", "/v1/completions", f"Content-Length: {5 << 20}"), iter([b" " * (64 << 10)]))
    assert declared[0] == 413
    import httpx

    ok = httpx.post(served.url + "/v1/completions", json={"model": "t", "prompt": "Hi", "max_tokens": 2}, headers=AUTH, timeout=60)
    assert ok.status_code == 200  # the worker is fine


def test_transfer_encoding_with_content_length_is_refused(served: Any) -> None:
    smuggled = b'5\r\n{"a":\r\n0\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n'
    status, headers, body = _raw(served.port, _head("POST", "/v1/completions", "Transfer-Encoding: chunked", "Content-Length: 5"),
                                 iter([smuggled]))  # fmt: skip
    assert status == 400 and headers.get("connection") == "close", (status, headers, body)
    assert json.loads(body)["error"]["code"] == "ambiguous_framing"


# -- 5. a long session is prepared off the event loop, in time linear in the turns kept -------


def _long_session(sid: str, turns: int) -> dict[str, Any]:
    one = {**_session(sid)["turns"][0], "messages": [{"role": "user", "content": "Hello, how are you today?"},
                                                      {"role": "assistant", "content": "Fine, thanks."}]}  # fmt: skip
    return {**_session(sid), "turns": [one] * turns}


def test_a_300_turn_session_is_prepared_off_the_loop_rendering_each_kept_turn_once(model_dir: Path, tmp_path: Path) -> None:
    import threading

    from tests.support.sessions import backend, talk, turn

    b = backend(model_dir, tmp_path)
    (tmp_path / "sessions").mkdir(parents=True)
    (tmp_path / "sessions" / "long.json").write_text(json.dumps(_long_session("long", 300)))
    calls: list[str] = []
    render = b.tokenizer.apply_chat_template

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(threading.current_thread().name)
        return render(*args, **kwargs)

    b.tokenizer.apply_chat_template = counted
    results = talk(b, [turn("And now?", session="long")], max_context=300)
    assert results[0][0] == 200, results[0]
    session = results[0][1]["x_zoo"]["session"]
    kept = 300 - session["dropped_turns"]
    assert 0 < kept < 300
    assert threading.main_thread().name not in calls  # the event loop (the test's main thread) never renders
    assert len(calls) <= 3 * (kept + 2), (len(calls), kept)  # dropping one turn at a time re-rendered the whole history each time
    transcript = json.loads((tmp_path / "sessions" / "long.json").read_text())
    assert len(transcript["turns"]) == 301 and transcript["turns"][-1]["dropped_turns"] == session["dropped_turns"]


def _reference_prompt(tokenizer: Any, history: list[Any], new: list[dict[str, str]], budget: int) -> tuple[int, list[int]]:
    """The former algorithm: the whole history rendered turn by turn, one turn dropped at a time."""

    def ids_of(turns: list[Any]) -> list[int]:
        messages: list[dict[str, str]] = []
        ids: list[int] = []
        rendered = ""
        for prompt, done in [*(([m.model_dump() for m in t.messages[:-1]], t) for t in turns), (new, None)]:
            messages += prompt
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if ids and text.startswith(rendered):
                delta = tokenizer(text[len(rendered):], add_special_tokens=False)["input_ids"]
                ids += delta[1:] if ids[-1] == tokenizer.eos_token_id and delta[:1] == [tokenizer.eos_token_id] else delta
            else:
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if done is not None:
                ids += done.completion_ids
                messages.append(done.messages[-1].model_dump())
                rendered = text + done.messages[-1].content
        return list(ids)

    dropped = 0
    while len(ids_of(history[dropped:])) > budget and dropped < len(history):
        dropped += 1
    return dropped, ids_of(history[dropped:])


@pytest.mark.parametrize("template", ["append-only", "rewrites"])
def test_the_linear_prompt_equals_the_former_one(model_dir: Path, template: str) -> None:
    from transformers import PreTrainedTokenizerFast

    from zoo_agent.resident.sessions.prompt import session_prompt
    from zoo_agent.resident.sessions.transcript import SessionFile

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    if template == "rewrites":  # newest first: every turn changes the text before it
        tokenizer.chat_template = "{% for m in messages|reverse %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}<|assistant|>"
    eos = tokenizer.eos_token_id
    turns = [{**_session("s")["turns"][0], "messages": [{"role": "user", "content": f"Question {i} about the zoo?"},
                                                        {"role": "assistant", "content": f"Answer {i}."}],
              "completion_ids": [7 + i, 8, eos] if i % 2 else [9, 10 + i]} for i in range(12)]  # fmt: skip
    history = SessionFile.model_validate({"id": "s", "turns": turns}).turns
    new = [{"role": "user", "content": "And the lions?"}]
    for budget in (10, 40, 80, 150, 10_000):
        assert session_prompt(tokenizer, history, new, budget) == _reference_prompt(tokenizer, history, new, budget), budget


def test_the_worker_serves_a_300_turn_session_and_is_not_killed_for_it(served: Any, tmp_path: Path) -> None:
    import httpx

    (tmp_path / "long.json").write_text(json.dumps(_long_session("long-300", 300)))
    assert served.world.raw("sessions", "import", *served.world.args(str(tmp_path / "long.json"))).exit_code == 0
    pid = served.worker_pid()
    body = {"model": "t", "session": "long-300", "messages": [{"role": "user", "content": "And now?"}], "max_tokens": 4}
    answer = httpx.post(served.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["x_zoo"]["session"]["dropped_turns"] > 0
    assert httpx.get(served.url + "/health", timeout=30).status_code == 200 and served.worker_pid() == pid


# -- 6. request validation: strict types, Unicode text, seeds torch takes, stop and n ------------


BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"seed": 2**64}, "seed"), ({"seed": 2**64, "stream": True}, "seed"), ({"seed": -1}, "seed"),
    ({"max_tokens": True}, "max_tokens"), ({"max_tokens": "5"}, "max_tokens"), ({"max_tokens": 5.0}, "max_tokens"),
    ({"stream": "yes"}, "stream"), ({"temperature": "0.5"}, "temperature"), ({"ignore_eos": 1}, "ignore_eos"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"), ({"model": "t\udfff"}, "model"),
    ({"session": "s\ud800"}, "session"), ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"n": 2}, "n"), ({"n": 0}, "n"), ({"n": True}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": ""}, "stop"), ({"stop": 5}, "stop"), ({"stop": ["\ud800"]}, "stop"),
]  # fmt: skip


def test_wrong_types_and_values_are_openai_400s_naming_the_field(app: Any) -> None:
    responses = ask(app, *[("/v1/chat/completions", {**CHAT, **change}) for change, _ in BAD_FIELDS],
                    ("/v1/completions", {"model": "t", "prompt": "\ud800"}), ("/v1/chat/completions", {**CHAT, "n": 1}))  # fmt: skip
    for (change, param), r in zip([*BAD_FIELDS, ({"prompt": "\ud800"}, "prompt")], responses, strict=False):
        assert r.status_code == 400, (change, r.status_code, r.text[:300])
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and str(error["param"]).startswith(param), (change, error)
    assert "only n=1 is supported" in responses[[c for c, _ in BAD_FIELDS].index({"n": 2})].json()["error"]["message"]
    assert responses[-1].status_code == 200  # n=1 is fine


def test_a_400_names_the_field_in_the_clients_words_and_counts_come_before_items(app: Any) -> None:
    """A union's branch is no field and its repr holds an address (``function-after[functools.
    partial(<function … at 0x…>)]``); half a million bad messages were validated one by one and
    took the worker past its ping timeout: the count is checked first (issue #31, adversarial pass)."""
    five, many = ask(app, ("/v1/chat/completions", {**CHAT, "stop": ["a"] * 5}),
                     ("/v1/chat/completions", {**CHAT, "messages": [0] * 300_000}))  # fmt: skip
    error = five.json()["error"]
    assert five.status_code == 400 and error["param"] == "stop" and "at most 4 items" in error["message"], error
    assert "0x" not in five.text and "function-after" not in five.text
    error = many.json()["error"]
    assert many.status_code == 400 and error["param"] == "messages" and error["message"] == "messages: at most 10000 messages, not 300000", error


def test_stop_ends_the_text_before_the_first_stop_sequence(app: Any) -> None:
    plain = ask(app, ("/v1/chat/completions", CHAT))[0].json()
    text = plain["choices"][0]["message"]["content"]
    assert len(text) > 6 and plain["choices"][0]["finish_reason"] == "length"
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    expected = text[: text.find(stop)]
    answers = ask(app, ("/v1/chat/completions", {**CHAT, "stop": stop}), ("/v1/chat/completions", {**CHAT, "stop": ["\u2603 never", stop]}),
                  ("/v1/chat/completions", {**CHAT, "stop": stop, "stream": True}),
                  ("/v1/completions", {"model": "t", "prompt": "Hello", "max_tokens": 12, "ignore_eos": True}))  # fmt: skip
    for r in answers[:2]:
        choice = r.json()["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == (expected, "stop"), choice
    events = [json.loads(line.removeprefix("data: ")) for line in answers[2].text.splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == expected
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and answers[2].text.rstrip().endswith("data: [DONE]")
    completion = answers[3].json()["choices"][0]["text"]
    stop = completion[len(completion) // 2 :][:3]
    cut = ask(app, ("/v1/completions", {"model": "t", "prompt": "Hello", "max_tokens": 12, "ignore_eos": True, "stop": [stop]}))[0].json()
    assert cut["choices"][0] == {**cut["choices"][0], "text": completion[: completion.find(stop)], "finish_reason": "stop"}


# -- 7. a non-streaming client that goes away stops its generation ----------------------------


def _metric(served: Any, name: str) -> float:
    import httpx

    text = httpx.get(served.url + "/metrics", timeout=30).text
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith((name + " ", name + "{"))), 0.0)  # the router labels by tenant


def _wait_for(check: Any, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the bounded wait"
        time.sleep(0.1)


def test_a_non_streaming_client_that_disconnects_cancels_its_generation(served: Any) -> None:
    cancelled = _metric(served, "zoo:request_cancelled_total")
    body = json.dumps({"model": "t", "prompt": "Hello", "max_tokens": 4000, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", served.port), timeout=60) as s:
        s.sendall(_head("POST", "/v1/completions", f"Content-Length: {len(body)}") + body)
        _wait_for(lambda: _metric(served, "zoo:num_requests_running") == 1.0)  # generating now
    # Gone: the generation stops before its 4000 tokens (ignore_eos: a full one makes exactly that many).
    _wait_for(lambda: _metric(served, "zoo:request_cancelled_total") == cancelled + 1)
    _wait_for(lambda: _metric(served, "zoo:num_requests_running") == 0.0)


# -- 8. the worker dies with its supervisor --------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie nobody reaped is dead
    except FileNotFoundError:
        return False


def test_sigkill_of_the_supervisor_takes_the_worker_with_it(model_dir: Path, tmp_path: Path) -> None:
    import signal
    import threading

    import httpx

    from tests.support.resident import Resident

    world = World(tmp_path)
    world.artifact("m", "v1", {p.name: p.read_bytes() for p in sorted(model_dir.iterdir())})
    assert world.run("apply").exit_code == 0
    r = Resident(world)
    outcome: list[object] = []
    try:
        r.notify.wait(lambda m: "READY" in m, timeout=120)
        worker = r.worker_pid()

        def long_request() -> None:
            try:
                outcome.append(httpx.post(r.url + "/v1/completions", json={"model": "t", "prompt": "Hi", "max_tokens": 4000, "ignore_eos": True},
                                          timeout=300).status_code)  # fmt: skip
            except httpx.HTTPError as exc:
                outcome.append(exc)

        client = threading.Thread(target=long_request)
        client.start()
        _wait_for(lambda: 'zoo:num_requests_running{tenant="t"} 1.0' in httpx.get(r.url + "/metrics", timeout=30).text)
        r.proc.send_signal(signal.SIGKILL)
        r.proc.wait(timeout=30)
        _wait_for(lambda: not _alive(worker), timeout=60)
        client.join(timeout=300)
    finally:
        r.stop()
    assert outcome and isinstance(outcome[0], httpx.HTTPError), outcome  # it did not finish the generation first


# -- 9. a generation that fails mid-stream ends the stream with an error event ------------------


@pytest.mark.parametrize("max_batch", [1, 8])
def test_a_generation_that_fails_mid_stream_ends_with_an_error_event(model_dir: Path, caplog: pytest.LogCaptureFixture, max_batch: int) -> None:
    """Both paths: one generate() at a time (max_batch 1) and the batching engine."""
    import logging

    from zoo_agent.resident.worker.app import ServingState, create_app
    from zoo_agent.resident.worker.backend import TransformersBackend

    b = TransformersBackend(model_dir, allow_pickle=False, allow_code=False, device="cpu")
    b.load()
    if max_batch == 1:
        real_stream = b.stream

        def failing(request: Any, result: Any, cancel: Any = None) -> Iterator[str]:
            for piece in real_stream(request, result, cancel):
                yield piece
                raise RuntimeError("the device went away")  # after the first piece

        def failing_complete(request: Any, result: Any, cancel: Any = None) -> str:
            raise RuntimeError("the device went away")

        b.stream, b.complete = failing, failing_complete  # type: ignore[method-assign]
    else:
        real_forward, decoded = b.model.forward, [0]

        def failing_forward(*args: Any, **kwargs: Any) -> Any:
            if kwargs["input_ids"].shape[1] == 1:  # a decode step (a prefill feeds the whole prompt)
                decoded[0] += 1
                if decoded[0] > 30:  # pieces were streamed first
                    raise RuntimeError("the device went away")
            return real_forward(*args, **kwargs)

        b.model.forward = failing_forward
    app = create_app(ServingState("t", "m", "1", b, {"max_tokens": 40, "temperature": 0.0, "top_p": 1.0}, max_batch=max_batch))
    with caplog.at_level(logging.ERROR, logger="zoo_agent.resident"):
        streamed, plain = ask(app, ("/v1/chat/completions", {**CHAT, "stream": True, "max_tokens": 40}),
                              ("/v1/completions", {"model": "t", "prompt": "Hi", "max_tokens": 40, "ignore_eos": True}))
    events = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert streamed.status_code == 200 and events[-1] == "[DONE]", events
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "the device went away" in error["message"]
    assert any("content" in json.loads(e)["choices"][0]["delta"] for e in events[:-2])  # pieces came first
    assert plain.status_code == 500 and plain.json()["error"]["code"] == "generation_failed"
    assert any("generation failed" in r.getMessage() for r in caplog.records)


# -- 10. the bearer token: the scheme is required, an empty key file refused -------------------


def test_the_bearer_scheme_is_required_and_the_token_compared_whole(served: Any) -> None:
    import httpx

    cases = {f"{KEY}": 401, f"Bearer {KEY}x": 401, f"Bearer {KEY[:-1]}": 401, f"Basic {KEY}": 401, "Bearer": 401, "": 401,
             f"Bearer {KEY}": 200, f"bearer {KEY}": 200}  # fmt: skip
    for header, status in cases.items():
        r = httpx.get(served.url + "/v1/models", headers={"Authorization": header} if header else {}, timeout=30)
        assert r.status_code == status, (header, r.text)
        if status == 401:
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    twice = _raw(served.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n")
    assert twice[0] == 401
    assert httpx.get(served.url + "/health", timeout=30).status_code == 200  # health needs no token


@pytest.mark.parametrize(("content", "why"), [(b"", "empty"), (b"  \n\t\n", "empty"), (b"two words\n", "spaces"), (b"\xff\xfe", "not ASCII")])
def test_an_unusable_api_key_file_refuses_to_start_in_one_line(world: World, tmp_path: Path, content: bytes, why: str) -> None:
    from tests.support.resident import free_port

    world.artifact("m", "v1", {"config.json": b"{}"})
    (tmp_path / "key").write_bytes(content)
    proc = world.spawn("resident", "--api-key-file", str(tmp_path / "key"), "--listen", f"127.0.0.1:{free_port()}")
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # it started serving without auth: stop it, then fail below
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and why in lines[0] and "--api-key-file" in lines[0], err
