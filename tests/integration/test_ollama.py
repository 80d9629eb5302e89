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


MAX_CONTEXT = 2048  # declared: the daemon's num_ctx


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
    world.tenant = {"backend": "ollama", "resources": {"max_context": MAX_CONTEXT}}
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
        # The tenant's context is the daemon's num_ctx, the load's too (a differing num_ctx reloads the model).
        assert [g["options"]["num_ctx"] for g in generations[:2]] == [MAX_CONTEXT, MAX_CONTEXT]
        body = {"model": "t", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        answer = httpx.post(r.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert answer["system_fingerprint"] == "m@1" and len(answer["choices"][0]["message"]["content"].split()) == 5
        assert answer["usage"]["completion_tokens"] == 5
        streamed = httpx.post(r.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60).text
        assert streamed.rstrip().endswith("data: [DONE]") and streamed.count('"content"') >= 5
        assert {g["options"]["num_ctx"] for _, path, g in daemon.requests if path == "/api/chat"} == {MAX_CONTEXT}
        assert 'zoo:generation_tokens_total{tenant="t"} 10.0' in httpx.get(r.url + "/metrics").text
        assert httpx.get(daemon.url + "/api/ps").json()["models"][0]["expires_at"].startswith("20")
        pid = r.worker_pid("t")
        daemon.stop(keep_port=True)
        # Alone on the host, the tenant is unavailable, not failed (issue #35): the resident stays up and says why.
        away = r.notify.wait(lambda m: "unavailable" in m.get("STATUS", ""), timeout=60)
        assert f"t m@1 (unavailable: the Ollama daemon at {daemon.url} does not answer" in away["STATUS"]
        refused = httpx.post(r.url + "/v1/chat/completions", json=body, timeout=60)
        assert refused.status_code == 503 and 1 <= int(refused.headers["retry-after"]) <= 5
        assert refused.json()["error"]["message"].startswith(f"tenant 't' is unavailable: the Ollama daemon at {daemon.url} does not answer")
        back = daemon.restarted()
        try:
            assert _answers(r.url, "t", timeout=60) == 200  # and the daemon loaded the model again, for good
            assert r.proc.poll() is None and r.worker_pid("t") == pid  # the worker stayed up throughout
            assert [m["name"] for m in httpx.get(back.url + "/api/ps").json()["models"]] == ["llama3.2:1b"]
        finally:
            back.stop()
    finally:
        out = r.stop()
    assert "Traceback" not in out and "cannot load" not in out


def _answers(url: str, tenant: str, timeout: float) -> int:
    """The first status other than 503 a chat request for ``tenant`` gets, asking every 0.2 s (a liveness bound, not a timing)."""
    import time

    import httpx

    body = {"model": tenant, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code
        if status != 503:
            return status
        time.sleep(0.2)
    return 503


def _two_tenants(world: World, tiny: dict[str, bytes], *, ollama_pinned: bool, transformers_pinned: bool) -> None:
    """Tenant o through the daemon, tenant t a tiny transformers model, on one host."""
    world.artifact("tm", "1", tiny)
    models = {**world.models, "m": {"version": "1", "source": {"type": "ollama", "name": "llama3.2:1b", "digest": DIGEST}, "files": [],
                                    "format": "ollama", "license": "other"}}  # fmt: skip
    gen = {"generation": {"temperature": 0, "max_tokens": 4}}
    tenants = {"o": {"model": "m", "backend": "ollama", "pinned": ollama_pinned}, "t": {"model": "tm", "pinned": transformers_pinned, **gen}}
    world.index.write_text(json.dumps({"models": models, "loras": {}, "tenants": tenants, "hosts": {"h": {"tenants": ["o", "t"]}}}, indent=2))


def test_the_daemon_away_for_10s_fails_nothing_of_another_tenant_and_its_own_tenant_serves_again(
        world: World, daemon: OllamaStandIn, tiny: dict[str, bytes]) -> None:  # fmt: skip
    """Issue #35: the daemon stopped for 10 s while a transformers tenant serves: zero failures there;
    the Ollama tenant is answered 503 with Retry-After, naming itself and the daemon, and answers
    again once the daemon is back. Then `ollama rm` behind the zoo's back: 503 naming the model,
    until `apply` pulls it again. Never an exit, never a new worker."""
    import threading
    import time

    import httpx

    from tests.support.resident import Resident

    _two_tenants(world, tiny, ollama_pinned=True, transformers_pinned=True)
    assert world.run("apply").exit_code == 0
    r = Resident(world, env={"OLLAMA_HOST": daemon.url})
    back: OllamaStandIn | None = None
    stop, seen = threading.Event(), list[int | str]()

    def ask_t() -> None:  # the transformers tenant, asked without pause throughout
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                try:
                    seen.append(client.post(r.url + "/v1/completions", json={"model": "t", "prompt": "Hello"}).status_code)
                except httpx.HTTPError as exc:
                    seen.append(type(exc).__name__)

    asking = threading.Thread(target=ask_t)
    try:
        r.wait_ready()
        assert _answers(r.url, "o", timeout=30) == 200
        pid = r.worker_pid("o")
        asking.start()
        stopped_at = len(r.notify.messages)
        daemon.stop(keep_port=True)
        away_since = time.monotonic()
        refusals = []
        while time.monotonic() - away_since < 10:
            answer = httpx.post(r.url + "/v1/chat/completions", json={"model": "o", "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
            refusals.append((answer.status_code, answer.headers.get("retry-after"), answer.json()["error"]["message"]))
            time.sleep(0.5)
        assert refusals and all(code == 503 and after is not None and 1 <= int(after) <= 5 for code, after, _ in refusals), refusals
        assert all(message.startswith(f"tenant 'o' is unavailable: the Ollama daemon at {daemon.url} ") for _, _, message in refusals), refusals
        health = httpx.get(r.url + "/health", timeout=10).json()
        assert health["state"] == "ready" and health["tenants"]["t"]["state"] == "serving"
        assert health["tenants"]["o"]["state"] == "unavailable" and daemon.url in health["tenants"]["o"]["error"]
        status = r.wait(lambda m: "o m@1 (unavailable: " in m.get("STATUS", ""), timeout=30, after=stopped_at)["STATUS"]
        assert f"(unavailable: the Ollama daemon at {daemon.url} does not answer" in status and "t tm@1" in status
        back, restarted_at = daemon.restarted(), len(r.notify.messages)
        assert _answers(r.url, "o", timeout=60) == 200
        stop.set()
        asking.join(timeout=120)
        assert len(seen) >= 3 and set(seen) == {200}, [s for s in seen if s != 200][:5]  # zero failures of the other tenant
        assert r.wait(lambda m: "o m@1 (" in m.get("STATUS", "") and "unavailable" not in m["STATUS"], timeout=30, after=restarted_at)
        o = httpx.get(r.url + "/health", timeout=10).json()["tenants"]["o"]
        assert o["state"] == "serving" and "error" not in o

        del back.local["llama3.2:1b"]  # `ollama rm llama3.2:1b` behind the zoo's back
        back.loaded.clear()
        gone = httpx.post(r.url + "/v1/chat/completions", json={"model": "o", "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
        assert gone.status_code == 503 and "does not have llama3.2:1b (HTTP 404; zoo-agent apply pulls it again)" in gone.json()["error"]["message"]
        assert world.run("apply").exit_code == 0  # drift: pulled again, its digest checked
        assert _answers(r.url, "o", timeout=60) == 200
        assert r.proc.poll() is None and r.worker_pid("o") == pid  # one worker throughout: it never exited
    finally:
        stop.set()
        if asking.is_alive():
            asking.join(timeout=120)
        if back is not None:
            back.stop()
        out = r.stop()
    assert "worker died" not in out and "Traceback" not in out


def test_a_pinned_ollama_tenant_whose_daemon_is_away_at_start_keeps_no_other_tenant_from_serving(
        world: World, daemon: OllamaStandIn, tiny: dict[str, bytes]) -> None:  # fmt: skip
    """Issue #35: READY comes once the pinned tenant's worker is up, unavailable and saying why
    (docs/ollama.md); the other tenant loads on its first request and serves; the Ollama tenant
    serves once its daemon starts."""
    import httpx

    from tests.support.resident import Resident

    _two_tenants(world, tiny, ollama_pinned=True, transformers_pinned=False)
    assert world.run("apply").exit_code == 0
    daemon.stop(keep_port=True)
    r = Resident(world, env={"OLLAMA_HOST": daemon.url})
    back: OllamaStandIn | None = None
    try:
        r.wait_ready()
        status = r.notify.wait(lambda m: "unavailable" in m.get("STATUS", ""), timeout=30)["STATUS"]
        assert f"o m@1 (unavailable: the Ollama daemon at {daemon.url} does not answer" in status
        answer = httpx.post(r.url + "/v1/completions", json={"model": "t", "prompt": "Hello"}, timeout=120)
        assert answer.status_code == 200 and answer.json()["model"] == "t"
        refused = httpx.post(r.url + "/v1/completions", json={"model": "o", "prompt": "Hello"}, timeout=60)
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert refused.json()["error"]["message"].startswith(f"tenant 'o' is unavailable: the Ollama daemon at {daemon.url} does not answer")
        back = daemon.restarted()
        assert _answers(r.url, "o", timeout=60) == 200
        warm = [b for _, path, b in back.requests if path == "/api/generate" and b.get("prompt") == "Hello" and b["options"]["num_predict"] == 1]
        assert warm, "no warm-up generation through the engine before serving again"
        assert r.proc.poll() is None
    finally:
        if back is not None:
            back.stop()
        out = r.stop()
    assert "Traceback" not in out


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
