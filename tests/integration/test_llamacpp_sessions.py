"""Sessions on a llama.cpp tenant (issue #33): the same API as a transformers tenant's, the transcript
committed durably before the answer completes, the conversation replayed to `llama-server` (its
prompt cache reusing what it shares), and a SIGKILL of the whole resident losing no committed turn.

Real processes throughout: the resident, the `llama-server` that .ci/llama-cpp builds, the tiny
transformers model converted to GGUF by that source's converter, httpx on loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.llamacpp import LlamaCpp, declare_gguf, write_llama_index
from tests.support.resident import Resident
from tests.support.victim import make_victim, snapshot
from tests.support.world import World
from zoo_agent.resident.config import WorkerConfig
from zoo_agent.resident.engines.llamacpp import engine_env, server_argv
from zoo_agent.resident.engines.llamasessions import LlamaSessions

pytestmark = pytest.mark.resident

GENERATION = {"temperature": 0, "max_tokens": 12}
#: The slot files' key: a digest of model@version, the KV cache's type (f16 by default) and the adapters (none).
KEY = LlamaSessions(WorkerConfig(tenant="t", model="m", version="v1", version_dir=Path("/"), sessions_dir=Path("/")), "").slot_file("x")[2:-4]
TURNS = ["Hello there", "Tell me about the zoo", "And what about the lions?", "Which one is the oldest?"]


def _world(tmp: Path, gguf: Path, **resources: Any) -> World:
    world = World(tmp)
    declare_gguf(world, "m", "v1", {gguf.name: gguf.read_bytes()})
    write_llama_index(world, {"t": {"model": "m", "pinned": True, "generation": GENERATION,
                                    "resources": {"max_batch": 2, "max_context": 512, **resources}}})  # fmt: skip
    result = world.run("apply")
    assert result.exit_code == 0, result.output
    return world


@contextlib.contextmanager
def _direct(llama_cpp: LlamaCpp, gguf: Path, where: Path) -> Iterator[httpx.Client]:
    """`llama-server` started directly with the command line the resident gives tenant t."""
    config = WorkerConfig(tenant="t", model="m", version="v1", version_dir=gguf.parent, max_batch=2, max_context=512, defaults=GENERATION)
    (where / "direct-slots").mkdir(parents=True, exist_ok=True)
    sock = str(where / "direct.sock")
    proc = subprocess.Popen(server_argv(str(llama_cpp.server), config, gguf, sock, where / "direct-slots"), env=engine_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    client = httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://llama", timeout=60, headers={"Connection": "close"})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, "llama-server exited"
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:  # listening yet? (a refused httpx connect leaks its socket)
                probe.connect(sock)
                listening = True
            except OSError:
                listening = False
            finally:
                probe.close()
            if listening and client.get("/health").status_code == 200:
                break
            time.sleep(0.1)
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=30)


def _ask(url: str, sid: str, text: str, stream: bool = False) -> dict[str, Any]:
    """One turn of session ``sid``: the answer (a streamed one gathered into the same shape)."""
    body = {"model": "t", "session": sid, "messages": [{"role": "user", "content": text}]}
    if not stream:
        answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())
    events = []
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        lines = list(response.iter_lines())
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]", lines[-3:]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert not any("error" in e for e in events), events
    text = "".join(c.get("delta", {}).get("content") or "" for e in events for c in e.get("choices", []))
    last = next(e for e in reversed(events) if e.get("choices") and e["choices"][0].get("finish_reason"))
    return {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": last["choices"][0]["finish_reason"]}],
            "x_zoo": last.get("x_zoo")}  # fmt: skip


def _content(answer: dict[str, Any]) -> str:
    return str(answer["choices"][0]["message"]["content"])


def test_a_session_survives_sigkill_of_the_whole_resident_on_a_llama_cpp_tenant(llama_cpp: LlamaCpp, tiny_gguf: dict[str, Path],
                                                                                tmp_path: Path) -> None:  # fmt: skip
    world = _world(tmp_path, tiny_gguf["f32"])
    first = Resident(world, "--llama-server", str(llama_cpp.server))
    try:
        first.wait_ready(120)
        engine = json.loads((first.root / "resident/tenants/t/model-info.json").read_text())["pid"]
        answers = [_ask(first.url, "talk", text, stream=i == 1) for i, text in enumerate(TURNS[:3])]
    finally:
        first.proc.send_signal(signal.SIGKILL)  # right after the answers: nothing flushed on the way out
        out = first.stop()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # its llama-server dies with it (PR_SET_PDEATHSIG): no prompt cache survives
        try:
            os.kill(engine, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("llama-server outlived the resident")
    assert [a["x_zoo"]["session"]["id"] for a in answers] == ["talk"] * 3, answers
    assert answers[0]["x_zoo"]["session"]["cache"] == "none"
    transcript = json.loads((world.root / "resident/tenants/t/sessions/talk.json").read_text())
    assert [t["messages"][-1]["content"] for t in transcript["turns"]] == [_content(a) for a in answers]  # every answered turn, committed
    assert [t["messages"][0]["content"] for t in transcript["turns"]] == TURNS[:3]
    assert all(t["model"] == "m@v1" and t["completion_ids"] for t in transcript["turns"]), transcript

    slots = world.root / "resident/tenants/t/slots"
    assert sorted(p.name for p in slots.iterdir()) == [f"talk+{KEY}.bin", f"talk+{KEY}.bin.sha256"]  # its slot, saved with the turn
    sessions = world.root / "resident/tenants/t/sessions"
    (sessions / "no-slot.json").write_text(json.dumps({**transcript, "id": "no-slot"}))  # the same transcript, no saved slot
    (sessions / "flipped.json").write_text(json.dumps({**transcript, "id": "flipped"}))  # the same, its slot damaged
    damaged = bytearray((slots / f"talk+{KEY}.bin").read_bytes())
    damaged[len(damaged) // 2] ^= 0x40  # in the cache's bytes: llama-server would load it
    (slots / f"flipped+{KEY}.bin").write_bytes(bytes(damaged))
    (slots / f"flipped+{KEY}.bin.sha256").write_bytes((slots / f"talk+{KEY}.bin.sha256").read_bytes())

    second = Resident(world, "--llama-server", str(llama_cpp.server))
    try:
        second.wait_ready(120)
        reprefilled = _ask(second.url, "no-slot", TURNS[3], stream=True)  # first: the engine's cache holds no conversation yet
        resumed = _ask(second.url, "talk", TURNS[3])
        flipped = _ask(second.url, "flipped", TURNS[3])
        shown = httpx.get(second.url + "/v1/sessions/talk", params={"model": "t"}, timeout=30)
    finally:
        out += second.stop()
    assert "Traceback" not in out, out[-3000:]
    assert shown.status_code == 200 and len(shown.json()["turns"]) == 4, shown.text
    assert resumed["x_zoo"]["session"]["cache"] == "restored" and resumed["x_zoo"]["session"]["cached_tokens"] > 0, resumed
    assert resumed["x_zoo"]["session"]["dropped_turns"] == 0
    assert reprefilled["x_zoo"]["session"]["cache"] == "re-prefilled", reprefilled
    assert _content(reprefilled) == _content(resumed)  # the restored slot and the re-prefill: the same greedy answer
    assert flipped["x_zoo"]["session"]["cache"] != "restored" and _content(flipped) == _content(resumed), flipped
    assert "does not match its digest" in out
    conversation: list[dict[str, str]] = []
    for text, answer in zip(TURNS[:3], answers, strict=True):
        conversation += [{"role": "user", "content": text}, {"role": "assistant", "content": _content(answer)}]
    conversation.append({"role": "user", "content": TURNS[3]})
    with _direct(llama_cpp, tiny_gguf["f32"], tmp_path) as direct:
        expected = direct.post("/v1/chat/completions", json={"model": "t", "messages": conversation}).json()
        alone = direct.post("/v1/chat/completions", json={"model": "t", "messages": conversation[-1:]}).json()
    assert _content(resumed) == _content(expected), (resumed, expected)
    assert _content(alone) != _content(expected)  # the answer depends on the conversation: the test tells them apart


def test_one_turn_at_a_time_a_client_that_leaves_commits_nothing_and_the_session_paths_answer(llama_cpp: LlamaCpp, tiny_gguf: dict[str, Path],
                                                                                             tmp_path: Path) -> None:  # fmt: skip
    world = _world(tmp_path, tiny_gguf["q8_0"], max_context=4096)
    sessions = world.root / "resident/tenants/t/sessions"
    r = Resident(world, "--llama-server", str(llama_cpp.server))
    try:
        r.wait_ready(120)
        _ask(r.url, "s", TURNS[0])
        r.notify.wait(lambda m: ", 1 session," in m.get("STATUS", ""), timeout=30)

        # Links planted where llama-server saves and restores slots: never written or read through.
        victim = make_victim(tmp_path / "victim")
        before = snapshot(victim)
        target = next(p for p in victim.rglob("*") if p.is_file())
        slots = world.root / "resident/tenants/t/slots"
        (slots / f".s+{KEY}.bin.tmp").symlink_to(target)  # where the next save of s is written first
        (sessions / "ln.json").write_text(json.dumps({**json.loads((sessions / "s.json").read_text()), "id": "ln"}))
        (slots / f"ln+{KEY}.bin").symlink_to(target)  # a "saved slot" of ln
        assert _ask(r.url, "ln", TURNS[1])["x_zoo"]["session"]["cache"] != "restored"
        _ask(r.url, "s", TURNS[1])
        assert snapshot(victim) == before
        assert (slots / f"s+{KEY}.bin").is_file() and not (slots / f"s+{KEY}.bin").is_symlink()
        assert not (slots / f".s+{KEY}.bin.tmp").exists() and not (slots / f".s+{KEY}.bin.tmp").is_symlink()
        assert httpx.delete(r.url + "/v1/sessions/ln", params={"model": "t"}, timeout=30).status_code == 200
        assert not (slots / f"ln+{KEY}.bin").is_symlink() and snapshot(victim) == before  # the link went, not its target
        long = {"model": "t", "session": "s", "stream": True, "max_tokens": 3000, "ignore_eos": True, "messages": [{"role": "user", "content": "Go on"}]}
        with httpx.Client(base_url=r.url, timeout=120) as client, client.stream("POST", "/v1/chat/completions", json=long) as stream:
            lines = stream.iter_lines()  # kept: a generator of httpx's that goes closes the response
            first = next(lines)
            assert first.startswith("data: {") and "error" not in first, first  # under way; the rest waits for us to read it
            busy = httpx.post(r.url + "/v1/chat/completions", json={**long, "stream": False, "max_tokens": 4}, timeout=60)
        # The client left before the end: its turn is not in the transcript.
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "session_busy", busy.text
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the front lets go of the session once the engine's answer is closed
            if (after := httpx.post(r.url + "/v1/chat/completions", json={**long, "stream": False, "max_tokens": 4}, timeout=60)).status_code != 409:
                break
            time.sleep(0.1)
        assert after.status_code == 200, after.text
        shown = httpx.get(r.url + "/v1/sessions/s", params={"model": "t"}, timeout=30).json()
        assert [t["messages"][0]["content"] for t in shown["turns"]] == [TURNS[0], TURNS[1], "Go on"], shown
        assert shown["turns"][2]["sampling"]["max_tokens"] == 4

        # Turns that do not fit the context with the answer are left out of the prompt, and kept in the transcript.
        tight = httpx.post(r.url + "/v1/chat/completions", timeout=120, json={"model": "t", "session": "s", "max_tokens": 4096 - 40,
                                                                              "messages": [{"role": "user", "content": TURNS[2]}]})  # fmt: skip
        assert tight.status_code == 200, tight.text
        assert tight.json()["x_zoo"]["session"]["dropped_turns"] >= 2, tight.json()["x_zoo"]
        assert tight.json()["usage"]["prompt_tokens"] <= 40
        assert len(json.loads((sessions / "s.json").read_text())["turns"]) == 4

        (sessions / "bad.json").write_text('{"id": "bad", "turns": [{"messages": "no"}]}')
        damaged = httpx.post(r.url + "/v1/chat/completions", json={**CHAT_BODY, "session": "bad"}, timeout=60)
        assert damaged.status_code == 422 and damaged.json()["error"]["code"] == "session_damaged", damaged.text
        assert httpx.get(r.url + "/v1/sessions/bad", params={"model": "t"}, timeout=30).status_code == 422
        invalid = httpx.post(r.url + "/v1/chat/completions", json={**CHAT_BODY, "session": "../../x"}, timeout=60)
        assert invalid.status_code == 400 and invalid.json()["error"]["param"] == "session", invalid.text
        assert httpx.delete(r.url + "/v1/sessions/bad", params={"model": "t"}, timeout=30).json()["deleted"] is True
        assert httpx.get(r.url + "/v1/sessions/bad", params={"model": "t"}, timeout=30).status_code == 404
        assert httpx.delete(r.url + "/v1/sessions/s", params={"model": "t"}, timeout=30).status_code == 200
        assert sorted(p.name for p in sessions.iterdir() if not p.name.startswith(".")) == []
        r.notify.wait(lambda m: "t m@v1 (" in m.get("STATUS", "") and "session" not in m["STATUS"], timeout=30)  # Status: counts them
    finally:
        out = r.stop()
    assert "Traceback" not in out, out[-3000:]
    assert not (tmp_path / "x.json").exists() and not (world.root / "x.json").exists()


CHAT_BODY = {"model": "t", "messages": [{"role": "user", "content": "Hello"}]}
