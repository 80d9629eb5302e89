"""Several tenants per host under a memory budget, and fetch on first use (issue #20).

The fit is proven by ``plan`` and ``apply`` before anything switches; an on-demand tenant
is declared but fetched only by ``fetch_tenant`` (what the resident calls on its first
request), with the same verified, resumable fetch as ``apply``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.hubserver import HubServer, Repo, serve
from tests.support.world import World
from zoo_agent.errors import InvalidIndex, LockHeld, UsageError
from zoo_agent.reconcile.ondemand import fetch_tenant
from zoo_agent.store.zoo import Zoo

# 2 (K, V) x 2 layers x 2 heads x 32 per head x 4 bytes x 1024 positions x 16 sequences = 16 MiB
CONFIG = json.dumps({"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 64, "max_position_embeddings": 1024,
                     "torch_dtype": "float32"}).encode()  # fmt: skip
KV = 2 * 2 * 2 * 32 * 4 * 1024 * 16
WEIGHTS = os.urandom(10_000)
BIG = os.urandom(5 << 20)
HUB_CONFIG = CONFIG[:-1] + b', "model_type": "llama"}'  # the same KV cache, other bytes: read from the hub, not reused
HUB_FILES = {"config.json": HUB_CONFIG, "model.safetensors": BIG}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with serve() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def _declare(world: World, tenants: dict[str, dict[str, Any]], **host: Any) -> None:
    """The world's models, these tenants, and host h serving all of them."""
    doc = {"models": world.models, "loras": world.loras, "tenants": tenants, "hosts": {"h": {"tenants": list(tenants), **host}}}
    world.index.write_text(json.dumps(doc, indent=2))


def _model(world: World, aid: str = "m", version: str = "v1", config: bytes = CONFIG) -> None:
    world.artifact(aid, version, {"config.json": config, "model.safetensors": WEIGHTS})


def _hub_model(world: World, hub: HubServer, aid: str = "od") -> None:
    commit = hub.repos.setdefault("org/od", Repo()).commit(HUB_FILES)
    world.artifact(aid, "v1", HUB_FILES, source={"type": "hf", "repo": "org/od", "revision": commit})


def _model_gets(hub: HubServer) -> list[Any]:
    return [h for h in hub.log if h.method == "GET" and h.path.endswith("model.safetensors")]


# -- the fit, before anything switches ------------------------------------------------------


def test_pinned_tenants_that_cannot_fit_change_nothing(world: World) -> None:
    """Two pinned tenants of one model need 2 x (weights + 16 MiB KV); the budget holds one."""
    _model(world)
    _declare(world, {"a": {"model": "m", "pinned": True}}, memory_budget="20M")
    assert world.run("apply").exit_code == 0
    _model(world, version="v2")  # a new version that must not switch either
    _declare(world, {"a": {"model": "m", "pinned": True}, "b": {"model": "m", "pinned": True}}, memory_budget="20M")
    before = world.tree()
    need = f"{(10_000 + KV) / 1e6:.1f} MB"
    expected = (f"{world.index}: /hosts/h/memory_budget: pinned tenants a ({need}) and b ({need}) need {2 * (10_000 + KV) / 1e6:.1f} MB "
                "together; the budget is 20M (21.0 MB)")  # fmt: skip
    for command in ("plan", "apply"):
        result = world.run(command)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == expected
        assert "Traceback" not in result.output
        assert world.tree() == before
    assert world.current("m") == "v1"


def test_a_tenant_that_cannot_fit_alone_is_refused_from_the_sources_config(world: World) -> None:
    """The version is not on disk: plan cannot know its KV cache and says so; apply reads the
    declared config.json from the source first and refuses before staging a byte."""
    _model(world)
    _declare(world, {"a": {"model": "m"}}, memory_budget="10M")
    plan = world.run("plan")
    assert plan.exit_code == 0, plan.output
    assert "tenant a: 10.0 kB of weights; KV cache unknown until its config.json is fetched" in plan.stdout
    result = world.run("apply")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"{world.index}: /hosts/h/memory_budget: tenant a needs {(10_000 + KV) / 1e6:.1f} MB (weights 10.0 kB + "
                                     f"KV {KV / 1e6:.1f} MB), more than the whole budget; the budget is 10M (10.5 MB)")  # fmt: skip
    assert not (world.root / "models").exists()
    assert not list(world.root.rglob("*.tmp*"))


def test_a_declared_context_that_does_not_fit_is_refused_and_a_smaller_one_is_applied(world: World) -> None:
    """The KV cache is budgeted for the declared max_context x max_batch, a transformers tenant's as a llama.cpp one's (issue #33)."""
    _model(world)
    _declare(world, {"a": {"model": "m", "resources": {"max_context": 1024}}}, memory_budget="12M")
    result = world.run("apply")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"{world.index}: /hosts/h/memory_budget: tenant a needs {(10_000 + KV) / 1e6:.1f} MB (weights 10.0 kB + "
                                     f"KV {KV / 1e6:.1f} MB), more than the whole budget; the budget is 12M (12.6 MB)")  # fmt: skip
    _declare(world, {"a": {"model": "m", "resources": {"max_context": 512}}}, memory_budget="12M")  # half the context: half the cache
    assert world.run("apply").exit_code == 0
    fit = json.loads(world.run("plan", "--json").stdout)["fit"]
    assert fit["tenants"]["a"]["kv"] == KV // 2, fit


def test_weights_alone_over_the_budget_are_refused_by_validate(world: World) -> None:
    _model(world)
    _declare(world, {"a": {"model": "m"}}, memory_budget="5K")
    result = world.raw("validate", str(world.index))
    assert result.exit_code == 2
    assert "/hosts/h/memory_budget: tenant a needs 10.0 kB of weights alone, more than the whole budget; the budget is 5K (5.1 kB)" in result.stderr


def test_plan_shows_the_footprints(world: World) -> None:
    _model(world)
    _declare(world, {"a": {"model": "m", "pinned": True}, "b": {"model": "m", "resources": {"max_batch": 1}}}, memory_budget="64M")
    assert world.run("apply").exit_code == 0
    fit = json.loads(world.run("plan", "--json").stdout)["fit"]
    assert fit["budget"] == 64 << 20 and fit["budget_spec"] == "64M" and fit["pinned"] == ["a"] and fit["problems"] == []
    assert fit["tenants"]["a"] == {"weights": 10_000, "kv": KV, "total": 10_000 + KV, "kv_known": True, "config": "zoo"}
    assert fit["tenants"]["b"]["kv"] == KV // 16
    assert fit["pinned_total"] == 10_000 + KV
    human = world.run("plan").stdout.splitlines()
    assert human[-3:] == [f"memory budget 64M (67.1 MB); pinned a: {(10_000 + KV) / 1e6:.1f} MB",
                          f"  tenant a: {(10_000 + KV) / 1e6:.1f} MB (weights 10.0 kB + KV {KV / 1e6:.1f} MB)",
                          f"  tenant b: {(10_000 + KV // 16) / 1e6:.1f} MB (weights 10.0 kB + KV {KV / 16e6:.1f} MB)"]  # fmt: skip


# -- fetch on first use ---------------------------------------------------------------------


def _on_demand_world(world: World, hub: HubServer, **host: Any) -> None:
    _model(world)
    _hub_model(world, hub)
    _declare(world, {"a": {"model": "m"}, "later": {"model": "od", "fetch": "on-demand"}}, **host)


def test_an_on_demand_tenant_waits_for_its_first_request_and_survives_gc(world: World, hub: HubServer) -> None:
    _on_demand_world(world, hub)
    assert world.run("apply").exit_code == 0
    assert world.current("m") == "v1" and not (world.root / "models/od").exists()
    assert _model_gets(hub) == []
    status = json.loads(world.run("status", "--json").stdout)
    assert status["ok"] and {r["id"]: r["state"] for r in status["artifacts"]} == {"m": "ok", "od": "on-demand"}
    calls: list[tuple[int, int]] = []
    fetch_tenant(world.index, world.root, "h", "later", lambda done, total: calls.append((done, total)))
    assert (world.root / "models/od/current/model.safetensors").read_bytes() == BIG
    total = len(HUB_CONFIG) + len(BIG)
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and len(calls) > 2
    gc = world.run("gc")
    assert gc.exit_code == 0, gc.output
    assert world.current("od") == "v1" and world.current("m") == "v1"
    assert json.loads(world.run("status", "--json").stdout)["ok"]
    fetch_tenant(world.index, world.root, "h", "later")  # up to date: nothing more comes over
    assert len(_model_gets(hub)) == 1


def test_apply_tenant_fetches_only_that_tenant(world: World, hub: HubServer) -> None:
    _on_demand_world(world, hub)
    result = world.run("apply", "--tenant", "later")
    assert result.exit_code == 0, result.output
    assert world.current("od") == "v1" and not (world.root / "models/m").exists()
    assert not world.root.joinpath("host/applied-index.json").exists()  # the zoo does not match the whole index
    refused = world.run("apply", "--tenant", "ghost")
    assert refused.exit_code == 2 and "tenant 'ghost' is not served by host 'h' (its tenants: a, later)" in refused.stderr


def test_a_tenant_the_host_does_not_serve_is_never_fetched(world: World, hub: HubServer) -> None:
    _on_demand_world(world, hub)
    doc = json.loads(world.index.read_text())
    doc["tenants"]["other"] = {"model": "od", "fetch": "on-demand"}  # declared, but not for host h
    world.index.write_text(json.dumps(doc))
    assert world.run("apply").exit_code == 0
    before = world.tree()
    for tenant in ("other", "ghost", "../../etc"):
        with pytest.raises(UsageError, match=rf"tenant '{tenant}' is not served by host 'h' \(its tenants: a, later\)"):
            fetch_tenant(world.index, world.root, "h", tenant)
    with pytest.raises(UsageError, match="host 'elsewhere' is not in the index"):
        fetch_tenant(world.index, world.root, "elsewhere", "later")
    assert world.tree() == before and _model_gets(hub) == []


def test_an_on_demand_tenant_must_fit_too(world: World, hub: HubServer) -> None:
    """apply reads the on-demand model's config.json (only that file) to prove the host fits;
    the fetch on first use proves it again before it stages a byte."""
    _on_demand_world(world, hub)
    assert world.run("apply").exit_code == 0
    doc = json.loads(world.index.read_text())
    doc["hosts"]["h"]["memory_budget"] = "16M"  # the on-demand model's KV cache alone is 16 MiB
    doc["tenants"]["a"]["resources"] = {"max_batch": 1}
    world.index.write_text(json.dumps(doc))
    before = world.tree()
    message = r"/hosts/h/memory_budget: tenant later needs 22.0 MB \(weights 5.2 MB \+ KV 16.8 MB\), more than the whole budget"
    result = world.run("apply")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert re.search(message, result.stderr), result.stderr
    assert [h.path.rsplit("/", 1)[1] for h in hub.log if h.method == "GET"] == ["config.json"]
    with pytest.raises(InvalidIndex, match=message):
        fetch_tenant(world.index, world.root, "h", "later")
    assert world.tree() == before and _model_gets(hub) == []


def test_concurrent_first_requests_fetch_once(world: World, hub: HubServer) -> None:
    _on_demand_world(world, hub)
    hub.faults.stall["model.safetensors"] = 0.5  # the first is still fetching when the second asks
    errors: list[BaseException] = []

    def first_request() -> None:
        try:
            fetch_tenant(world.index, world.root, "h", "later")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=first_request) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert sorted(p.name for p in (world.root / "models/od/versions").iterdir()) == ["v1"]
    assert len(_model_gets(hub)) == 1
    assert (world.root / "models/od/current/model.safetensors").read_bytes() == BIG


def test_a_running_apply_is_waited_for_then_lock_held(world: World, hub: HubServer) -> None:
    _on_demand_world(world, hub)
    assert world.run("apply").exit_code == 0
    with Zoo(world.root).lock():
        started = time.monotonic()
        with pytest.raises(LockHeld):
            fetch_tenant(world.index, world.root, "h", "later", lock_timeout=0.3)
        assert time.monotonic() - started >= 0.3
    assert not (world.root / "models/od").exists()


def test_a_fetch_killed_midway_converges_on_the_next_call(world: World, hub: HubServer) -> None:
    _on_demand_world(world, hub)
    hub.faults.pause_at["model.safetensors"] = (3 << 20) + 12345
    code = ("import sys; from pathlib import Path; from zoo_agent.reconcile.ondemand import fetch_tenant;"
            "fetch_tenant(Path(sys.argv[1]), Path(sys.argv[2]), 'h', 'later')")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code, str(world.index), str(world.root)], cwd=world.tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert hub.faults.paused.wait(timeout=30)
    deadline, staged = time.monotonic() + 20, 0
    while staged < 3 << 20 and time.monotonic() < deadline:  # the client writes whole 1 MiB chunks
        staged = sum(p.stat().st_size for p in world.root.rglob("model.safetensors"))
        time.sleep(0.05)
    assert staged == 3 << 20
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    hub.faults.resume.set()
    assert not (world.root / "models/od/current").exists()
    before = len(hub.log)
    fetch_tenant(world.index, world.root, "h", "later")
    second = sum(h.sent for h in hub.log[before:] if h.path.endswith("model.safetensors"))
    assert second <= len(BIG) - staged + (1 << 20), (staged, second)
    assert (world.root / "models/od/current/model.safetensors").read_bytes() == BIG
    assert [p.name for p in (world.root / "models/od/versions").iterdir()] == ["v1"]  # no staging left behind


def test_a_failed_fetch_is_one_line(world: World, hub: HubServer) -> None:
    from zoo_agent.reconcile.ondemand import FetchFailed

    _on_demand_world(world, hub)
    hub.faults.wrong_bytes.add("model.safetensors")
    with pytest.raises(FetchFailed) as caught:
        fetch_tenant(world.index, world.root, "h", "later")
    assert caught.value.exit_code == 1 and "\n" not in str(caught.value)
    assert str(caught.value).startswith("tenant later: ") and "model.safetensors: sha256 " in str(caught.value)
    assert not (world.root / "models/od/current").exists()


def test_verify_repair_puts_a_damaged_on_demand_version_back(world: World, hub: HubServer) -> None:
    _on_demand_world(world, hub)
    assert world.run("apply").exit_code == 0
    fetch_tenant(world.index, world.root, "h", "later")
    weights = world.root / "models/od/current/model.safetensors"
    os.chmod(weights, 0o644)
    with weights.open("r+b") as f:
        f.write(b"\0" * 16)
    result = world.run("verify", "--repair")
    assert result.exit_code == 0, result.output
    assert weights.read_bytes() == BIG and world.current("od") == "v1"
