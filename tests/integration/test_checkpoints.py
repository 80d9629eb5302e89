"""Named checkpoints with the tiny model (issue #36): a checkpoint restored after the session went
on answers as the session did at checkpoint time (greedy), from its frozen cache; over the
resident's HTTP API, behind its key, with timed checkpoints and retention, and hostile paths refused."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.sessions import backend, reply, talk, turn
from tests.support.victim import make_victim, snapshot
from tests.support.world import World
from zoo_agent.resident.sessions.checkpoints import Checkpoints

pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")

pytestmark = pytest.mark.resident

TURNS = ["Hello there", "Tell me about the zoo", "And what about the lions?", "Further on", "And further still"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zoo_agent.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("checkpoints") / "model")


def _session(result: tuple[int, Any]) -> dict[str, Any]:
    return dict(result[1]["x_zoo"]["session"])


def test_a_restored_checkpoint_answers_as_the_session_did_at_checkpoint_time(model_dir: Path, tmp_path: Path) -> None:
    b = backend(model_dir, tmp_path)
    talk(b, [turn(TURNS[0]), turn(TURNS[1])])
    Checkpoints(tmp_path).create("s", "cp", keep=3)
    went_on = talk(b, [turn(TURNS[2]), turn(TURNS[3]), turn(TURNS[4])])  # the session goes on past the checkpoint
    Checkpoints(tmp_path).restore("cp", "back")
    Checkpoints(tmp_path).restore("cp", "cold")
    (tmp_path / "kv-cache" / "cold.safetensors").unlink()  # the same conversation, prefilled again
    back, cold = talk(b, [turn(TURNS[2], session="back"), turn(TURNS[2], session="cold")])[:2]
    assert reply(back) == reply(went_on[0]) == reply(cold)
    assert _session(back)["cache"] == "restored" and _session(cold)["cache"] == "re-prefilled"
    assert _session(back)["cached_tokens"] == _session(went_on[0])["cached_tokens"] > 40  # the whole conversation at checkpoint time
    later = talk(b, [turn(TURNS[3], session="back")])  # and it goes on as the session did
    assert reply(later[0]) == reply(went_on[1])
    transcript = json.loads((tmp_path / "sessions" / "back.json").read_text())
    assert transcript["restored_from"] == "s/cp" and len(transcript["turns"]) == 4


def test_checkpoints_over_http_behind_the_key_timed_and_kept_and_hostile_paths_refused(world: World, model_dir: Path, tmp_path: Path) -> None:
    import httpx

    from tests.support.resident import Resident

    world.artifact("m", "v1", {p.name: p.read_bytes() for p in sorted(model_dir.iterdir())})
    world.tenant = {"generation": {"temperature": 0, "max_tokens": 12}, "sessions": {"checkpoints": {"keep": 3, "every": "2s"}}}
    world.write_index()
    assert world.run("apply").exit_code == 0
    (tmp_path / "key").write_text("sekrit\n")
    victim = make_victim(tmp_path / "victim")
    before = snapshot(victim)
    r = Resident(world, "--api-key-file", str(tmp_path / "key"))
    auth = {"Authorization": "Bearer sekrit"}
    base = world.root / "resident" / "tenants" / "t"

    def chat(sid: str, text: str) -> dict[str, Any]:
        answer = httpx.post(r.url + "/v1/chat/completions", json=turn(text, session=sid), headers=auth, timeout=60)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def call(method: str, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        return httpx.request(method, r.url + path, json=body, timeout=30, **{"headers": auth, **kw})

    try:
        r.wait_ready()
        for text in TURNS[:2]:
            chat("s", text)
        assert call("POST", "/v1/sessions/s/checkpoints", {"name": "cp"}, headers={}).status_code == 401
        made = call("POST", "/v1/sessions/s/checkpoints", {"name": "cp"})
        assert made.status_code == 200 and made.json()["name"] == "cp" and made.json()["caches"] == 1, made.text
        went_on = [chat("s", text) for text in TURNS[2:]]
        restored = call("POST", "/v1/checkpoints/cp/restore", {"session": "back"})
        assert restored.status_code == 200 and restored.json()["id"] == "back", restored.text
        back = chat("back", TURNS[2])
        assert back["choices"][0]["message"]["content"] == went_on[0]["choices"][0]["message"]["content"]
        assert back["x_zoo"]["session"]["cache"] == "restored"
        assert "cp" in [c["name"] for c in call("GET", "/v1/sessions/s/checkpoints").json()["data"]]
        for _ in range(4):  # timed: a checkpoint after each turn that comes 2 s after the newest; 3 kept
            time.sleep(2.2)
            chat("clock", "tick")
        clock = [c for c in call("GET", "/v1/checkpoints").json()["data"] if c["session"] == "clock"]
        assert len(clock) == 3 and {c["kind"] for c in clock} == {"timed"} and clock[-1]["turns"] == 4, clock
        for path, body, status in [("/v1/checkpoints/..%2F..%2Fvictim/restore", None, 400),  # matched as sent: a name that is no checkpoint name
                                   ("/v1/checkpoints/cp/restore", {"session": "../../victim"}, 400),
                                   ("/v1/sessions/s/checkpoints", {"name": "../../victim"}, 400), ("/v1/sessions/..%2Fx/checkpoints", None, 400)]:  # fmt: skip
            answer = call("POST", path, body)
            assert answer.status_code == status and answer.json()["error"]["message"], (path, answer.text)
        (base / "checkpoints" / "planted").symlink_to(victim)  # a link planted where a session's checkpoints go
        chat("planted", "hi")
        answer = call("POST", "/v1/sessions/planted/checkpoints", {"name": "evil"})
        assert answer.status_code == 409 and answer.json()["error"]["code"] == "unsafe_path", answer.text
    finally:
        r.stop()
    result = world.raw("sessions", "list", *world.args("--json"))
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [c["name"] for c in listed["checkpoints"] if c["session"] == "s"][0] == "cp"
    assert next(s for s in listed["sessions"] if s["id"] == "clock")["checkpoints"] == [c["name"] for c in clock]
    assert snapshot(victim) == before and not os.path.lexists(victim / "evil")
