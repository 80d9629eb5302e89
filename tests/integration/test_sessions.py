"""Sessions (issue #9): committed turns survive SIGKILL, the KV cache is used only when it is
the right one, and continuing from it gives the same tokens as prefilling again."""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.support.sessions import backend, reply, talk, turn
from tests.support.world import World

pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")

pytestmark = pytest.mark.resident

TURNS = ["Hello there", "Tell me about the zoo", "And what about the lions?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zoo_agent.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("sessions") / "model")


def test_a_session_continues_from_its_cache_with_the_same_tokens_as_a_re_prefill(model_dir: Path, tmp_path: Path) -> None:
    b = backend(model_dir, tmp_path / "a")
    results = talk(b, [turn(t) for t in TURNS])
    assert [r[1]["x_zoo"]["session"]["cache"] for r in results[:3]] == ["none", "restored", "restored"]
    assert results[2][1]["x_zoo"]["session"]["cached_tokens"] > 20
    assert "zoo:session_cache_restores_total 2.0" in results[3][1]
    # The cache covered everything the model had seen: the whole previous turn, its reply included.
    first_total = results[0][1]["usage"]["prompt_tokens"] + results[0][1]["usage"]["completion_tokens"]
    assert results[1][1]["x_zoo"]["session"]["cached_tokens"] == first_total - 1  # the last token was generated, never fed
    # And from the transcript alone (cache file gone): prefilled again, the same tokens.
    shutil.copytree(tmp_path / "a" / "sessions", tmp_path / "b" / "sessions")
    transcript = json.loads((tmp_path / "b" / "sessions" / "s.json").read_text())
    transcript["turns"] = transcript["turns"][:2]
    (tmp_path / "b" / "sessions" / "s.json").write_text(json.dumps(transcript))
    again = talk(backend(model_dir, tmp_path / "b"), [turn(TURNS[2])])
    assert again[0][1]["x_zoo"]["session"]["cache"] == "re-prefilled" and reply(again[0]) == reply(results[2])


def test_a_cache_saved_under_another_version_is_not_used(model_dir: Path, tmp_path: Path) -> None:
    talk(backend(model_dir, tmp_path, model_key="m@1"), [turn(TURNS[0])])
    assert (tmp_path / "kv-cache" / "s.safetensors").exists()
    after_swap = talk(backend(model_dir, tmp_path, model_key="m@2"), [turn(TURNS[1])])
    assert after_swap[0][1]["x_zoo"]["session"]["cache"] == "re-prefilled"
    assert "zoo:session_reprefills_total 1.0" in after_swap[1][1]
    transcript = json.loads((tmp_path / "sessions" / "s.json").read_text())
    assert [t["model"] for t in transcript["turns"]] == ["m@1", "m@2"]


def test_a_damaged_cache_is_ignored_logged_and_the_session_goes_on(model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    b = backend(model_dir, tmp_path / "a")
    first = talk(b, [turn(TURNS[0]), turn(TURNS[1])])
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name in ("a", "b"):  # the same conversation, one turn back
        transcript = json.loads((tmp_path / name / "sessions" / "s.json").read_text())
        transcript["turns"] = transcript["turns"][:1]
        (tmp_path / name / "sessions" / "s.json").write_text(json.dumps(transcript))
    kv = tmp_path / "b" / "kv-cache" / "s.safetensors"
    data = bytearray(kv.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensors
    kv.write_bytes(bytes(data[: len(data) - 7]))  # and a truncated tail
    with caplog.at_level(logging.WARNING, logger="zoo_agent.resident"):
        damaged = talk(backend(model_dir, tmp_path / "b"), [turn(TURNS[1])])
    assert damaged[0][1]["x_zoo"]["session"]["cache"] == "re-prefilled"
    assert reply(damaged[0]) == reply(first[1])
    assert any("is damaged" in r.getMessage() and "ignored, re-prefilling" in r.getMessage() for r in caplog.records)
    assert "zoo:session_cache_corrupt_total 1.0" in damaged[1][1]


def test_sessions_are_read_and_deleted_through_the_api(model_dir: Path, tmp_path: Path) -> None:
    b = backend(model_dir, tmp_path)
    results = talk(b, [turn(TURNS[0]), {"_method": "GET", "_path": "/v1/sessions/s"}, {"_method": "DELETE", "_path": "/v1/sessions/s"},
                       {"_method": "GET", "_path": "/v1/sessions/s"}, {"_method": "GET", "_path": "/v1/sessions/no%20way"},
                       turn(TURNS[0], session="../etc")])  # fmt: skip
    transcript = results[1][1]
    assert transcript["id"] == "s" and len(transcript["turns"]) == 1
    first = transcript["turns"][0]
    assert first["messages"] == [{"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": reply(results[0])}]
    assert len(first["completion_ids"]) == 12 and first["model"] == "m@1" and first["sampling"]["temperature"] == 0.0
    assert len(first["template"]) == 16 and first["finish_reason"] == "length"
    assert results[2] == (200, {"id": "s", "object": "session.deleted", "deleted": True})
    assert results[3][0] == 404 and results[3][1]["error"]["code"] == "session_not_found"
    assert results[4][0] == 400 and results[5][0] == 400
    assert "is not a session id" in results[5][1]["error"]["message"]
    assert not (tmp_path / "kv-cache" / "s.safetensors").exists()


def test_old_turns_are_dropped_from_the_prompt_when_the_context_is_full(model_dir: Path, tmp_path: Path) -> None:
    b = backend(model_dir, tmp_path)
    long = "Hello, how are you? " * 3  # 23 prompt tokens, 12 generated: two such turns pass 60
    results = talk(b, [turn(long), turn(long), turn("short")], max_context=60)
    assert [r[1]["x_zoo"]["session"]["dropped_turns"] for r in results[:3]] == [0, 1, 1]
    transcript = json.loads((tmp_path / "sessions" / "s.json").read_text())
    assert len(transcript["turns"]) == 3  # the transcript keeps every turn; only the prompt leaves some out


# -- the resident process: SIGKILL, restart, continue --------------------------------------


def test_a_session_survives_sigkill_and_continues_token_for_token(world: World, model_dir: Path) -> None:
    import httpx

    from tests.support.resident import Resident

    world.artifact("m", "v1", {p.name: p.read_bytes() for p in sorted(model_dir.iterdir())})
    world.tenant = {"generation": {"temperature": 0, "max_tokens": 12}}
    world.write_index()
    assert world.run("apply").exit_code == 0

    def ask(r: Resident, sid: str, text: str) -> dict[str, Any]:
        return dict(httpx.post(r.url + "/v1/chat/completions", json=turn(text, session=sid), timeout=60).json())

    first = Resident(world)
    try:
        first.notify.wait(lambda m: "READY" in m, timeout=120)
        baseline = [ask(first, "baseline", t) for t in TURNS]  # uninterrupted
        killed = [ask(first, "killed", t) for t in TURNS[:2]]
        first.notify.wait(lambda m: "2 sessions" in m.get("STATUS", ""), timeout=30)
    finally:
        first.proc.send_signal(signal.SIGKILL)  # right after the answers: nothing flushed on the way out
        first.stop()
    sessions = world.root / "resident/tenants/t/sessions"
    copy = json.loads((sessions / "killed.json").read_text())  # the same transcript, without its cache
    (sessions / "no-cache.json").write_text(json.dumps({**copy, "id": "no-cache"}))
    second = Resident(world)
    try:
        second.notify.wait(lambda m: "READY" in m, timeout=120)
        resumed = ask(second, "killed", TURNS[2])
        reprefilled = ask(second, "no-cache", TURNS[2])
    finally:
        second.stop()
    assert [k["choices"][0]["message"]["content"] for k in killed] == [b["choices"][0]["message"]["content"] for b in baseline[:2]]
    assert resumed["x_zoo"]["session"]["cache"] == "restored" and reprefilled["x_zoo"]["session"]["cache"] == "re-prefilled"
    expected = baseline[2]["choices"][0]["message"]["content"]
    assert resumed["choices"][0]["message"]["content"] == expected and reprefilled["choices"][0]["message"]["content"] == expected


def test_chat_in_a_terminal_resumes_its_session_and_the_cli_manages_sessions(world: World, model_dir: Path, tmp_path: Path) -> None:
    """`zoo-agent chat` through a pseudo-terminal (pexpect), then `zoo-agent sessions ...` on the files."""
    import sys

    import pexpect

    from tests.support.resident import Resident

    world.artifact("m", "v1", {p.name: p.read_bytes() for p in sorted(model_dir.iterdir())})
    world.tenant = {"generation": {"temperature": 0, "max_tokens": 6}, "sessions": {"keep": 1, "max_age_days": 30}}
    world.write_index()
    assert world.run("apply").exit_code == 0
    r = Resident(world)
    try:
        r.notify.wait(lambda m: "READY" in m, timeout=120)
        for banner, text, cache in [("new session talk", "Hello there", "none"), ("resuming session talk (1 turns)", "And then?", "restored")]:
            child = pexpect.spawn(sys.executable, ["-m", "zoo_agent", "chat", "--url", r.url, "--session", "talk"], encoding="utf-8", timeout=60)
            child.expect_exact(banner)
            child.expect_exact("you> ")
            child.sendline("/adapter nope")
            child.expect_exact("no adapter 'nope' here (adapters: none)")
            child.expect_exact("you> ")
            child.sendline(text)
            child.expect_exact(f"[m@v1 · session talk · cache {cache}]")
            child.expect_exact("you> ")
            child.sendline("/quit")
            child.expect_exact("resume with: zoo-agent chat --session talk")
            child.expect(pexpect.EOF)
        r.notify.wait(lambda m: re.search(r"\b1 session[,)]", m.get("STATUS", "")) is not None, timeout=30)
    finally:
        r.stop()
    def sessions(command: str, *args: str) -> Any:
        return world.raw("sessions", command, *world.args(*args))

    listed = json.loads(sessions("list", "--json").output)
    assert [(s["id"], s["turns"], s["cached"]) for s in listed["sessions"]] == [("talk", 2, True)]
    shown = sessions("show", "talk").output
    assert "user: Hello there" in shown and "user: And then?" in shown and "--- turn 2 · m@v1" in shown
    exported = sessions("export", "talk").output
    (tmp_path / "other.json").write_text(exported.replace('"id": "talk"', '"id": "other"'))
    assert sessions("import", str(tmp_path / "other.json")).exit_code == 0
    again = sessions("import", str(tmp_path / "other.json"))
    assert again.exit_code == 2 and "session 'other' exists; pass --force to replace it" in again.output
    pruned = json.loads(sessions("prune", "--json").output)  # keep: 1
    assert len(pruned["removed"]) == 1 and pruned["kept"] == 1
    assert [s["id"] for s in json.loads(sessions("list", "--json").output)["sessions"]] == ["other"]
