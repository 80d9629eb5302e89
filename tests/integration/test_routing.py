"""Routes (issue #21) through the real router: the rule that chose, fallback before the first
token (never after), and what every answer says about it. Real processes, tiny models."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from typing import Any

import pytest

from tests.support.resident import Resident
from tests.support.world import World

pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")

pytestmark = pytest.mark.resident

ROUTE = {"rules": [{"tenant": "small", "when": {"max_words": 12}}], "default": "large", "fallback": ["small"]}
LONG = "Tell me, in many words, " + " ".join(["about the zoo"] * 10)


def _index(world: World, budget: str | None = None, first_token_seconds: float = 60, large_pinned: bool = False,
           route: dict[str, Any] | None = None) -> None:  # fmt: skip
    gen = {"generation": {"temperature": 0, "max_tokens": 4}}
    host: dict[str, Any] = {"tenants": ["small", "large"], "routes": ["assistant"]}
    if budget:
        host["memory_budget"] = budget
    doc = {"models": world.models, "loras": {},
           "tenants": {"small": {"model": "m", **gen, "pinned": True, "resources": {"max_batch": 1}},
                       "large": {"model": "m2", **gen, "pinned": large_pinned, "resources": {"max_batch": 16}}},
           "routes": {"assistant": {**(route or ROUTE), "first_token_seconds": first_token_seconds}}, "hosts": {"h": host}}  # fmt: skip
    world.index.write_text(json.dumps(doc, indent=2))


@pytest.fixture
def routed(world: World, tiny: dict[str, bytes]) -> World:
    world.artifact("m", "v1", tiny)
    files = dict(tiny)
    files["config.json"] = tiny["config.json"].replace(b"{", b'{"_v": 2,', 1)
    world.artifact("m2", "v1", files)
    _index(world)
    assert world.run("apply").exit_code == 0
    return world


def _chat(r: Resident, text: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    import httpx

    body = {"model": "assistant", "messages": [{"role": "user", "content": text}], **kw}
    resp = httpx.post(r.url + "/v1/chat/completions", json=body, timeout=120)
    return resp.status_code, resp.json()


def _stream(r: Resident, text: str, **kw: Any) -> list[dict[str, Any]]:
    import httpx

    body = {"model": "assistant", "messages": [{"role": "user", "content": text}], "stream": True, **kw}
    with httpx.stream("POST", r.url + "/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def _pid(world: World, tenant: str) -> int:
    return int(json.loads((world.root / f"resident/tenants/{tenant}/model-info.json").read_text())["pid"])


def test_a_short_and_a_long_question_go_to_different_tenants_and_say_so(routed: World) -> None:
    import httpx

    r = Resident(routed)
    try:
        r.notify.wait(lambda m: "READY" in m)
        code, short = _chat(r, "What is a zoo?")
        assert code == 200 and short["model"] == "small"
        assert short["x_zoo"]["route"] == {"route": "assistant", "tenant": "small", "rule": "words<=12"}
        code, long = _chat(r, LONG)
        assert code == 200 and long["model"] == "large" and long["system_fingerprint"] == "m2@v1"
        assert long["x_zoo"]["route"] == {"route": "assistant", "tenant": "large", "rule": "default"}
        chunks = _stream(r, LONG)
        assert {c["model"] for c in chunks} == {"large"}
        assert chunks[-1]["choices"][0]["finish_reason"] and chunks[-1]["x_zoo"]["route"]["tenant"] == "large"
        assert all("x_zoo" not in c for c in chunks[:-1])  # only the last chunk carries it
        cards = httpx.get(r.url + "/v1/models", timeout=5).json()["data"]
        assert [m["id"] for m in cards] == ["small", "large", "assistant"]  # a route is listed after the tenants (issue #36)
        assert cards[-1]["x_zoo"] == {"kind": "route", "tenants": ["small", "large"], "description": ""}
        metrics = httpx.get(r.url + "/metrics", timeout=30).text
        assert 'zoo:route_requests_total{route="assistant",rule="words<=12",tenant="small"} 1.0' in metrics
        assert 'zoo:route_requests_total{route="assistant",rule="default",tenant="large"} 2.0' in metrics
    finally:
        r.stop()


def test_a_tenant_that_does_not_fit_falls_back_with_the_reason(routed: World) -> None:
    _index(routed, budget="8M")  # after apply: the small tenant fits, the large one (max_batch 16) does not
    r = Resident(routed)
    try:
        r.notify.wait(lambda m: "READY" in m)
        code, answer = _chat(r, LONG)
        assert code == 200 and answer["model"] == "small", answer
        route = answer["x_zoo"]["route"]
        assert (route["tenant"], route["rule"], route["fallback_from"]) == ("small", "default", "large")
        assert "the memory budget is" in route["reason"]
    finally:
        r.stop()


def test_no_first_token_in_time_falls_back_but_a_failure_after_it_never_does(routed: World) -> None:
    import httpx

    _index(routed, first_token_seconds=3, large_pinned=True)
    r = Resident(routed)
    try:
        r.notify.wait(lambda m: "READY" in m)
        assert _chat(r, LONG)[1]["model"] == "large"  # loaded
        large = _pid(routed, "large")
        os.kill(large, signal.SIGSTOP)  # hung: no first token
        try:
            chunks = _stream(r, LONG)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(large, signal.SIGKILL)
        assert {c["model"] for c in chunks} == {"small"}
        route = chunks[-1]["x_zoo"]["route"]
        assert (route["tenant"], route["fallback_from"]) == ("small", "large") and "first token within 3s" in route["reason"]
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # the killed worker is replaced once a request wants it
            with contextlib.suppress(OSError, ValueError, KeyError):
                if _pid(routed, "large") != large and json.loads(httpx.get(r.url + "/health", timeout=5).text)["tenants"]["large"]["state"] == "serving":
                    break
            _chat(r, LONG)
            time.sleep(0.5)
        # After the first token: the client gets an error event, not a second model's continuation.
        lines: list[str] = []

        def read() -> None:
            body = {"model": "assistant", "messages": [{"role": "user", "content": LONG}], "stream": True, "max_tokens": 400, "ignore_eos": True}
            with httpx.stream("POST", r.url + "/v1/chat/completions", json=body, timeout=120) as resp:
                for line in resp.iter_lines():
                    lines.append(line)

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 60
        while not any('"content"' in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(_pid(routed, "large"), signal.SIGKILL)
        reader.join(60)
        data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert any("error" in d for d in data), lines[-5:]
        assert {d["model"] for d in data if "model" in d} == {"large"}  # nothing from small after large's first token
        assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]"
    finally:
        r.stop()


# -- similarity rules: a real (tiny, bag-of-words) embedding model from the zoo ---------------------

TASK = "review this python code for bugs"
# What the tiny embedder really gives (tests/integration/test_lora.py builds the same kind):
# SIMILAR 0.62, OTHER 0.02 against TASK; the threshold sits between them with room on both sides.
SIMILAR = "could you please review my python code for bugs and errors"
OTHER = "tell me a long story about the weather in the mountains today"
SIMILAR_ROUTE = {"rules": [{"tenant": "large", "when": {"similar_to": TASK, "min_similarity": 0.4}}], "default": "small", "embedding_model": "e"}


@pytest.fixture
def similar(routed: World, tmp_path: Any) -> World:
    from zoo_agent.demo.tiny import build_tiny_embedder

    out = build_tiny_embedder(tmp_path / "embedder", " ".join([TASK, SIMILAR, OTHER]))
    routed.artifact("e", "1", {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()})
    _index(routed, route=SIMILAR_ROUTE)
    assert routed.run("apply").exit_code == 0
    assert (routed.root / "models/e/current").is_symlink()  # the host serves the route: apply fetched its embedding model
    return routed


def test_a_request_similar_to_the_described_task_goes_to_its_tenant_and_another_to_the_default(similar: World) -> None:
    import httpx

    r = Resident(similar)
    try:
        r.notify.wait(lambda m: "READY" in m)
        code, near = _chat(r, SIMILAR)
        assert code == 200 and near["model"] == "large", near
        route = near["x_zoo"]["route"]
        assert (route["tenant"], route["rule"]) == ("large", "similar>=0.4") and 0.5 < route["similarity"] < 0.75, route
        code, far = _chat(r, OTHER)
        assert code == 200 and far["model"] == "small", far
        route = far["x_zoo"]["route"]
        assert (route["tenant"], route["rule"]) == ("small", "default") and route["similarity"] < 0.2, route
        chunks = _stream(r, SIMILAR)
        assert {c["model"] for c in chunks} == {"large"} and chunks[-1]["x_zoo"]["route"]["rule"] == "similar>=0.4"
        metrics = httpx.get(r.url + "/metrics", timeout=30).text
        assert 'zoo:route_requests_total{route="assistant",rule="similar>=0.4",tenant="large"} 2.0' in metrics
    finally:
        r.stop()


def test_an_embedding_model_that_fails_verification_is_not_loaded_and_similarity_rules_do_not_match(similar: World) -> None:
    import asyncio

    from zoo_agent.index.model import Index
    from zoo_agent.resident.similarity import Similarity, route_tasks
    from zoo_agent.store.zoo import Zoo

    zoo, idx = Zoo(similar.root), Index.model_validate_json(similar.index.read_text())
    good = Similarity(zoo)
    good.take(route_tasks(zoo, idx, "h"))
    scores, why = asyncio.run(good.scores("assistant", SIMILAR))
    assert why is None and scores[TASK] > 0.5
    good.close()
    target = similar.root / "models/e/versions/1/model.safetensors"
    target.chmod(0o644)
    target.write_bytes(target.read_bytes()[:-1] + b"\x00")
    bad = Similarity(zoo)
    bad.take(route_tasks(zoo, idx, "h"))
    scores, why = asyncio.run(bad.scores("assistant", SIMILAR))
    assert scores == {} and why is not None and why.startswith(f"e@1: failed verification: {target}: expected sha256 "), why
    bad.close()
