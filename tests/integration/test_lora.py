"""LoRA adapters on the resident (issue #6): the right adapter really runs, bad ones are
refused, requests for different adapters do not leak into each other, runtime loading is
restricted to the zoo, new versions swap in place, and `<tenant>:auto` chooses by text.

A tiny model, three random adapters and a bag-of-words embedding model are built here.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.world import World

pytest.importorskip("peft", reason="the resident extra is not installed (pip install -e .[resident])")

from tests.support.lora import DESCRIPTIONS, LABELLED, PROMPT, THRESHOLD, adapter, backend, greedy, peft_reference  # noqa: E402
from tests.support.lora import call as call_all  # noqa: E402
from zoo_agent.resident.config import AdapterConfig  # noqa: E402

pytestmark = pytest.mark.resident

@pytest.fixture(scope="module")
def three(built: dict[str, Path]) -> Any:
    return backend(built, tuple(adapter(built, a) for a in DESCRIPTIONS), threshold=THRESHOLD)


@pytest.fixture(scope="module")
def singles(three: Any) -> dict[str | None, str]:
    return {aid: greedy(three, aid) for aid in (None, *DESCRIPTIONS)}


def test_each_adapter_changes_the_output_and_equals_peft_in_process(built: dict[str, Path], three: Any, singles: dict[str | None, str]) -> None:
    assert len(set(singles.values())) == 4, singles  # base and three adapters all differ
    for aid in DESCRIPTIONS:
        assert singles[aid] == peft_reference(built, aid), aid
    assert greedy(three, None) == singles[None]  # the base model is the base again after an adapter ran
    assert [a.label for a in three.adapters.loaded.values()] == ["code@1", "terse@1", "legal@1"]


@pytest.mark.parametrize(("edit", "declared_rank", "expected"), [
    ({"r": 4}, 8, "code@1: adapter_config.json: r is 4, the index declares rank 8"),
    ({"base_model_name_or_path": "Qwen/Qwen2-7B"}, 4, "code@1: adapter_config.json: base_model_name_or_path is 'Qwen/Qwen2-7B', but this tenant serves 'm'"),
    ({"target_modules": ["q_proj", "gate"]}, 4, "code@1: adapter_config.json: target module 'gate' is not in the base model"),
])
def test_an_adapter_that_contradicts_the_index_is_refused_and_the_rest_serve(
        built: dict[str, Path], tmp_path: Path, edit: dict[str, Any], declared_rank: int, expected: str, singles: dict[str | None, str]) -> None:  # fmt: skip
    bad = tmp_path / "code"
    shutil.copytree(built["code"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    b = backend(built, (AdapterConfig(id="code", version="1", dir=bad, rank=declared_rank), adapter(built, "terse")))
    assert b.adapters.refused == {"code": expected}
    assert list(b.adapters.loaded) == ["terse"] and greedy(b, "terse") == singles["terse"]
    status, body = asyncio.run(call(b, "POST", "/v1/chat/completions", {"model": "t:code", "messages": PROMPT}))
    assert status == 400 and body["error"]["message"] == f"model: adapter refused: {expected}"


async def call(b: Any, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    return (await call_all(b, [(method, path, body)]))[0]


def test_concurrent_requests_for_different_adapters_each_get_their_own(three: Any, singles: dict[str | None, str]) -> None:
    order = ["code", None, "legal", "terse", "code", None, "terse", "legal"]
    bodies = [{"model": f"t:{a}" if a else "t", "messages": PROMPT, "ignore_eos": True} for a in order]
    results = asyncio.run(call_all(three, [("POST", "/v1/chat/completions", body) for body in bodies]))
    for aid, (status, body) in zip(order, results, strict=True):
        assert status == 200 and body["choices"][0]["message"]["content"] == singles[aid], aid
        assert body.get("x_zoo", {}).get("adapter") == (f"{aid}@1" if aid else None)


def test_least_recently_used_adapters_are_unloaded_past_max_loras(built: dict[str, Path], singles: dict[str | None, str]) -> None:
    b = backend(built, tuple(adapter(built, a) for a in DESCRIPTIONS), max_loras=2)
    assert list(b.adapters.loaded) == ["code", "terse"]
    assert greedy(b, "legal") == singles["legal"] and list(b.adapters.loaded) == ["terse", "legal"]
    assert greedy(b, "code") == singles["code"] and list(b.adapters.loaded) == ["legal", "code"]
    assert b.adapters.stats.evictions == 2
    assert greedy(b, None) == singles[None]


def test_runtime_loading_takes_only_declared_adapters_and_never_a_path(built: dict[str, Path], singles: dict[str | None, str]) -> None:
    b = backend(built, (adapter(built, "code"), adapter(built, "terse")), max_loras=1)
    steps = [
        ("POST", "/v1/load_lora_adapter", {"lora_name": "code", "lora_path": str(built["legal"])}),
        ("POST", "/v1/load_lora_adapter", {"lora_name": "legal"}),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "code"}),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "code"}),
        ("POST", "/v1/load_lora_adapter", {"lora_name": "t:terse"}),
        ("GET", "/v1/models", None),
    ]
    results = [asyncio.run(call(b, *step)) for step in steps]
    assert results[0] == (400, {"error": {"message": "lora_path: refused; adapters are loaded only from the zoo, by the id the index declares",
                                          "type": "invalid_request_error", "param": "lora_path", "code": None}})
    assert results[1][0] == 404 and results[1][1]["error"]["message"] == "lora_name: 'legal' is not an adapter declared for tenant 't' (declared: code, terse)"
    assert results[2] == (200, "Success: LoRA adapter 'code' removed successfully.")
    assert results[3] == (400, {"error": {"message": "adapter 'code' is not loaded", "type": "invalid_request_error", "param": "lora_name", "code": None}})
    assert results[4] == (200, "Success: LoRA adapter 'terse' added successfully.")
    assert [(m["id"], m["parent"], m["root"]) for m in results[5][1]["data"]] == [("t", None, "m@1"), ("t:code", "t", "code@1"), ("t:terse", "t", "terse@1")]
    assert list(b.adapters.loaded) == ["terse"] and greedy(b, "code") == singles["code"]  # reloaded on demand
    metrics = asyncio.run(call(b, "GET", "/metrics"))[1]
    assert 'zoo:lora_loads_total{result="ok"} 3.0' in metrics and "zoo:lora_adapters_loaded 1.0" in metrics


def test_a_new_version_swaps_in_place_or_reloads_when_the_rank_changes(built: dict[str, Path], singles: dict[str | None, str]) -> None:
    b = backend(built, (adapter(built, "code"), adapter(built, "terse")))
    # Version 2 of "code" has terse's weights (same rank and targets): peft's hotswap, in place.
    assert b.update_adapters((adapter(built, "code", source="terse", version="2"), adapter(built, "terse"))) == ["code@2"]
    assert greedy(b, "code") == singles["terse"] and b.adapters.stats.swaps == 1
    # Version 3 has legal's weights, rank 8 on four modules: unloaded and loaded again.
    assert b.update_adapters((adapter(built, "code", source="legal", version="3"), adapter(built, "terse"))) == ["code@3"]
    assert greedy(b, "code") == singles["legal"] and greedy(b, "terse") == singles["terse"]
    # Version 4 contradicts the index (declared rank 16): refused, version 3 keeps serving.
    assert b.update_adapters((adapter(built, "code", source="legal", version="4", rank=16), adapter(built, "terse"))) == []
    assert b.adapters.refused["code@4"] == "code@4: adapter_config.json: r is 8, the index declares rank 16"
    assert greedy(b, "code") == singles["legal"]
    # Dropped from the index: unloaded.
    assert b.update_adapters((adapter(built, "terse"),)) == [] and list(b.adapters.loaded) == ["terse"]


def test_auto_picks_the_adapter_by_task_and_falls_back_to_the_base(three: Any) -> None:
    bodies = [{"model": "t:auto", "messages": [{"role": "user", "content": text}], "max_tokens": 2} for text, _ in LABELLED]
    bodies.append({"model": "t:auto", "messages": [{"role": "user", "content": "hello there weather today"}], "max_tokens": 2})
    results = asyncio.run(call_all(three, [("POST", "/v1/chat/completions", body) for body in bodies]))
    chosen = [body["x_zoo"]["adapter"] for _, body in results]
    assert chosen == [f"{aid}@1" for _, aid in LABELLED] + [None]
    assert all(body["x_zoo"]["similarity"] >= THRESHOLD for _, body in results[:-1]) and results[-1][1]["x_zoo"]["similarity"] < THRESHOLD
    status, models = asyncio.run(call(three, "GET", "/v1/models"))
    assert ("t:auto", "t") in [(m["id"], m["parent"]) for m in models["data"]]


def test_auto_is_counted_in_metrics_and_streams_say_which_adapter(three: Any) -> None:
    import httpx

    from zoo_agent.resident.worker.app import ServingState, create_app

    async def run() -> tuple[str, str]:
        state = ServingState("t", "m", "1", three, {"max_tokens": 3, "temperature": 0.0, "top_p": 1.0})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)), base_url="http://zoo", timeout=60) as client:
            body = {"model": "t:auto", "messages": [{"role": "user", "content": LABELLED[0][0]}], "stream": True}
            streamed = (await client.post("/v1/chat/completions", json=body)).text
            return streamed, (await client.get("/metrics")).text

    streamed, metrics = asyncio.run(run())
    last = json.loads([line for line in streamed.splitlines() if line.startswith("data: {")][-1][6:])
    assert last["x_zoo"]["adapter"] == "code@1" and last["choices"][0]["finish_reason"]
    assert 'zoo:lora_selections_total{adapter="code@1"} 1.0' in metrics


# -- the resident process, with adapters published by apply ------------------------------


@pytest.fixture
def lora_world(world: World, built: dict[str, Path]) -> Iterator[World]:
    def files(key: str) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(built[key].iterdir()) if p.is_file()}

    world.artifact("m", "v1", files("base"))
    world.artifact("code", "1", files("code"), kind="loras")
    world.artifact("terse", "1", files("terse"), kind="loras")
    world.tenant = {"generation": {"temperature": 0, "max_tokens": 8}}
    world.write_index()
    assert world.run("apply").exit_code == 0
    yield world


def test_the_resident_serves_published_adapters_and_follows_a_new_version_without_restart(
        lora_world: World, built: dict[str, Path], singles: dict[str | None, str]) -> None:  # fmt: skip
    import httpx

    from tests.support.resident import Resident

    r = Resident(lora_world)
    try:
        r.notify.wait(lambda m: "READY" in m, timeout=120)
        ids = [m["id"] for m in httpx.get(r.url + "/v1/models").json()["data"]]
        assert ids == ["t", "t:code", "t:terse"]

        def ask(model: str) -> str:
            body = {"model": model, "messages": PROMPT, "max_tokens": 12, "ignore_eos": True}
            return str(httpx.post(r.url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]["content"])

        assert ask("t:code") == singles["code"] and ask("t") == singles[None]
        # Explicit sets pass the router as they are (issue #36): in model, and in the body's x_zoo.
        assert ask("t:code+terse") == peft_reference(built, "code", also=("terse",), weights=(1.0, 1.0))
        body = {"model": "t", "messages": PROMPT, "max_tokens": 12, "ignore_eos": True,
                "x_zoo": {"adapters": [{"name": "terse", "scale": 0.5}, {"name": "code", "scale": -1}]}}  # fmt: skip
        answer = httpx.post(r.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert answer["choices"][0]["message"]["content"] == peft_reference(built, "terse", also=("code",), weights=(0.5, -1.0))
        assert answer["x_zoo"]["adapters"] == [{"id": "terse", "version": "1", "scale": 0.5}, {"id": "code", "version": "1", "scale": -1.0}]
        refused = httpx.post(r.url + "/v1/chat/completions", json={**body, "model": "t:code+legal", "x_zoo": None}, timeout=60)
        assert (refused.status_code, refused.json()["error"]["param"]) == (400, "model"), refused.text
        assert refused.json()["error"]["message"] == "model: adapter 'legal' is not declared for tenant 't' (declared: code, terse)"
        assert [m["id"] for m in httpx.get(r.url + "/v1/models").json()["data"]] == ids  # a set is asked for, never listed
        worker = r.worker_pid()
        lora_world.artifact("code", "2", {p.name: p.read_bytes() for p in sorted(built["terse"].iterdir()) if p.is_file()}, kind="loras")
        assert lora_world.run("apply").exit_code == 0
        deadline = time.monotonic() + 60
        while ask("t:code") != singles["terse"]:
            assert time.monotonic() < deadline, r.notify.messages[-3:]
            time.sleep(0.5)
        assert r.worker_pid() == worker  # swapped in place, no new worker
        r.notify.wait(lambda m: "adapters code@2,terse@1" in m.get("STATUS", "") or "adapters terse@1,code@2" in m.get("STATUS", ""), timeout=30)
    finally:
        r.stop()


def test_an_adapter_whose_bytes_fail_verification_is_refused(lora_world: World) -> None:
    from zoo_agent.index.model import Index
    from zoo_agent.resident.tenant import adapters_for
    from zoo_agent.store.zoo import Zoo

    target = lora_world.root / "loras" / "code" / "versions" / "1" / "adapter_model.safetensors"
    target.chmod(0o644)
    target.write_bytes(target.read_bytes()[:-1] + b"\x00")
    idx = Index.model_validate_json(lora_world.index.read_text())
    served, refused = adapters_for(Zoo(lora_world.root), idx, "t")
    assert [a.id for a in served] == ["terse"]
    assert refused["code"].startswith(f"code@1: failed verification: {target}: expected sha256 ")
