"""Ollama as a source (issue #11): the real `ollama` client against the stand-in daemon in
tests/support/ollamaserver.py (no Ollama server can be installed here)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.support.ollamaserver import OllamaStandIn
from tests.support.world import World
from zoo_agent.sources import ollama as ollama_source

pytestmark = pytest.mark.resident

MANIFEST = b'{"schemaVersion": 2, "layers": ["llama3.2:1b weights"]}'
DIGEST = "sha256:" + OllamaStandIn.digest_of(MANIFEST)


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> Iterator[OllamaStandIn]:
    server = OllamaStandIn({"llama3.2:1b": MANIFEST}).start()
    monkeypatch.setenv("OLLAMA_HOST", server.url)
    yield server
    server.stop()


@pytest.fixture
def ollama_world(world: World) -> World:
    world.models["m"] = {"version": "1", "source": {"type": "ollama", "name": "llama3.2:1b", "digest": DIGEST}, "files": [],
                         "format": "ollama", "license": "other"}  # fmt: skip
    world.tenant = {"backend": "ollama"}
    world.write_index()
    return world


def test_apply_pulls_checks_the_digest_and_publishes_a_manifest(ollama_world: World, daemon: OllamaStandIn) -> None:
    result = ollama_world.run("apply", "--json")
    assert result.exit_code == 0, result.output
    assert [(s["action"], s["ok"]) for s in json.loads(result.output[result.output.index("{"):])["steps"]] == [
        ("fetch", True), ("publish", True), ("swap-current", True)]
    manifest = json.loads((ollama_world.root / "models/m/versions/1/manifest.json").read_text())
    assert manifest["source"] == {"type": "ollama", "name": "llama3.2:1b", "digest": DIGEST} and manifest["files"] == []
    assert ("POST", "/api/pull", {"model": "llama3.2:1b", "insecure": False, "stream": True}) in daemon.requests
    pulls = len([r for r in daemon.requests if r[1] == "/api/pull"])
    again = ollama_world.run("apply", "--json")
    assert json.loads(again.output)["steps"] == [] and len([r for r in daemon.requests if r[1] == "/api/pull"]) == pulls


def test_a_tag_that_moved_is_refused_naming_both_digests(ollama_world: World, daemon: OllamaStandIn) -> None:
    daemon.faults["digest"] = "0" * 64
    result = ollama_world.run("apply")
    assert result.exit_code == 1
    assert f"ollama:llama3.2:1b: the daemon has digest sha256:{'0' * 64}, the index pins {DIGEST}; the tag moved" in result.stderr
    assert not (ollama_world.root / "models/m/current").exists() and not (ollama_world.root / "models/m/versions/1").exists()


def test_an_unknown_model_and_an_old_daemon_fail_at_once_in_one_line(ollama_world: World, daemon: OllamaStandIn) -> None:
    ollama_world.models["m"]["source"]["name"] = "nosuch:7b"
    ollama_world.write_index()
    result = ollama_world.run("apply")
    assert result.exit_code == 1 and "ollama:nosuch:7b: the registry does not know this model (pull model manifest: file does not exist)" in result.stderr
    assert len([r for r in daemon.requests if r[1] == "/api/pull"]) == 1  # not retried: it will not get better
    ollama_world.models["m"]["source"]["name"] = "llama3.2:1b"
    ollama_world.write_index()
    daemon.faults["too_old"] = True
    result = ollama_world.run("apply")
    assert result.exit_code == 1 and "the daemon is too old for this model; upgrade Ollama" in result.stderr


def test_a_daemon_that_is_down_or_stalls_is_retried_a_bounded_number_of_times(
        ollama_world: World, daemon: OllamaStandIn, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(ollama_source, "STALL_SECONDS", 0.5)
    daemon.faults["stall_pull"] = 2.0
    result = ollama_world.run("apply")
    assert result.exit_code == 1 and "ollama:llama3.2:1b: the pull stalled (nothing for 0.5s) (gave up after 4 attempts)" in result.stderr
    assert len([r for r in daemon.requests if r[1] == "/api/pull"]) == 4
    daemon.stop()
    result = ollama_world.run("apply")
    assert result.exit_code == 1
    assert f"ollama:llama3.2:1b: no Ollama daemon answers at {daemon.url} (OLLAMA_HOST) (gave up after 4 attempts)" in result.stderr
    assert not (ollama_world.root / "models/m/current").exists()


def test_a_model_deleted_from_the_daemon_is_drift_that_apply_pulls_again(ollama_world: World, daemon: OllamaStandIn) -> None:
    """`ollama rm` behind the zoo's back (issue #35): status and verify see it, apply pulls it
    again and checks its digest, and then all three are content."""
    assert ollama_world.run("apply").exit_code == 0
    del daemon.local["llama3.2:1b"]  # what `ollama rm llama3.2:1b` does to the daemon's store
    status = ollama_world.run("status", "--json")
    row = next(r for r in json.loads(status.stdout)["artifacts"] if r["id"] == "m")
    assert status.exit_code == 1 and row["state"].startswith("drifted: ollama:llama3.2:1b (the daemon no longer has sha256:"), status.output
    verify = ollama_world.run("verify")
    assert verify.exit_code == 1
    assert f"models/m/versions/1: the Ollama daemon no longer has llama3.2:1b {DIGEST}" in verify.output + verify.stderr
    pulls = len([r for r in daemon.requests if r[1] == "/api/pull"])
    again = ollama_world.run("apply", "--json")
    assert again.exit_code == 0, again.output
    assert [(s["action"], s["ok"]) for s in json.loads(again.output[again.output.index("{"):])["steps"]] == [("verify", True)]
    assert len([r for r in daemon.requests if r[1] == "/api/pull"]) == pulls + 1 and "llama3.2:1b" in daemon.local
    assert ollama_world.run("status").exit_code == 0 and ollama_world.run("verify").exit_code == 0


def test_a_daemon_that_does_not_answer_is_not_drift(ollama_world: World, daemon: OllamaStandIn) -> None:
    """Unknown is not lost: with the daemon stopped, status and a no-op apply change nothing
    and say why they could not check."""
    assert ollama_world.run("apply").exit_code == 0
    daemon.stop()
    status = ollama_world.run("status", "--json")
    assert status.exit_code == 0 and next(r for r in json.loads(status.stdout)["artifacts"] if r["id"] == "m")["state"] == "ok"
    assert "cannot check the Ollama models against the daemon: no Ollama daemon answers" in status.stderr
    again = ollama_world.run("apply", "--json")
    assert again.exit_code == 0 and json.loads(again.output[again.output.index("{"):])["steps"] == []


def test_an_empty_list_of_ollama_models_does_nothing(world: World, daemon: OllamaStandIn) -> None:
    world.write_index()
    assert world.run("apply").exit_code == 0 and daemon.requests == []


def test_the_resident_serves_through_the_daemon_and_reports_when_it_goes_away(ollama_world: World, daemon: OllamaStandIn) -> None:
    import httpx

    from tests.support.resident import Resident

    assert ollama_world.run("apply").exit_code == 0
    r = Resident(ollama_world, env={"OLLAMA_HOST": daemon.url})
    try:
        ready = r.notify.wait(lambda m: "READY" in m, timeout=120)
        assert ready["STATUS"].startswith("1 tenant: t m@1")
        # READY came after a real generation through the daemon, which keeps the model loaded for good.
        generations = [body for _, path, body in daemon.requests if path in ("/api/generate", "/api/chat")]
        assert (generations[0]["model"], generations[0]["prompt"], generations[0]["keep_alive"]) == ("llama3.2:1b", "", -1)  # load
        assert (generations[1]["prompt"], generations[1]["options"]["num_predict"], generations[1]["keep_alive"]) == ("Hello", 1, -1)  # warm-up
        body = {"model": "t", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        answer = httpx.post(r.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert answer["system_fingerprint"] == "m@1" and len(answer["choices"][0]["message"]["content"].split()) == 5
        assert answer["usage"]["completion_tokens"] == 5
        streamed = httpx.post(r.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60).text
        assert streamed.rstrip().endswith("data: [DONE]") and streamed.count('"content"') >= 5
        assert 'zoo:generation_tokens_total{tenant="t"} 10.0' in httpx.get(r.url + "/metrics").text
        assert httpx.get(daemon.url + "/api/ps").json()["models"][0]["expires_at"].startswith("20")
        daemon.stop()
        died = r.notify.wait(lambda m: "worker died" in m.get("STATUS", ""), timeout=60)
        assert f"the Ollama daemon at {daemon.url} does not answer" in died["STATUS"]
        r.notify.wait(lambda m: "ERRNO" in m, timeout=120)  # it cannot load again: the unit fails, saying why
        assert r.proc.wait(timeout=60) == 1
    finally:
        out = r.stop()
    assert "cannot load m@1" in out


def test_concurrent_requests_pass_through_to_the_daemon_which_batches_itself(ollama_world: World, daemon: OllamaStandIn) -> None:
    """Up to resources.max_batch requests reach the daemon at once (its OLLAMA_NUM_PARALLEL batches them), not one by one."""
    import threading

    import httpx

    from tests.support.resident import Resident

    ollama_world.tenant = {**ollama_world.tenant, "resources": {"max_batch": 4}}
    ollama_world.write_index()
    assert ollama_world.run("apply").exit_code == 0
    r = Resident(ollama_world, env={"OLLAMA_HOST": daemon.url})
    try:
        r.notify.wait(lambda m: "READY" in m, timeout=120)
        daemon.faults["word_seconds"] = 0.3
        go, answers = threading.Barrier(6), list[int]()

        def ask(stream: bool) -> None:
            go.wait()
            body = {"model": "t", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": stream}
            answers.append(httpx.post(r.url + "/v1/chat/completions", json=body, timeout=120).status_code)

        threads = [threading.Thread(target=ask, args=(n % 2 == 0,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert answers == [200] * 6
        assert daemon.most_generating == 4  # max_batch at once; the other two waited in the queue
    finally:
        r.stop()
