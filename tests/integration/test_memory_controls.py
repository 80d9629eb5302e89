"""The controls operators of model servers expect (issue #34): idle unload by keep_alive, load and
unload on demand through the CLI and the API, against the real resident and tiny models.

Orders are read from the action log (`page-in`/`page-out` records) and the answers, never from timing.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest

from tests.support.paging import GEN, ask, footprint
from tests.support.resident import Resident
from tests.support.world import World

pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")

pytestmark = pytest.mark.resident


def _paged(world: World) -> list[tuple[str, str, str]]:
    lines = (world.root / "host/actions.jsonl").read_text().splitlines()
    return [(r["action"], r["id"], r.get("reason", "")) for r in map(json.loads, lines) if r["action"] in ("page-in", "page-out")]


def _wait_for(predicate: Any, timeout: float = 60) -> None:
    """Until ``predicate()`` holds; a generous liveness bound, never a timing assertion."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not within the liveness bound"
        time.sleep(0.1)


@pytest.fixture
def four(world: World, tiny: dict[str, bytes]) -> World:
    world.artifact("m", "v1", tiny)
    tenants: dict[str, Any] = {"pin": {"model": "m", **GEN}, "idle": {"model": "m", **GEN}, "c": {"model": "m", **GEN},
                               "d": {"model": "m", **GEN}}  # fmt: skip
    doc = {"models": world.models, "loras": {}, "tenants": tenants, "hosts": {"h": {"tenants": list(tenants)}}}
    world.index.write_text(json.dumps(doc, indent=2))
    assert world.run("apply").exit_code == 0
    fp = footprint(world)
    tenants["pin"]["pinned"] = True
    tenants["idle"]["keep_alive"] = "1s"
    doc["hosts"]["h"]["memory_budget"] = str(int(fp * 2.5))  # room for the pinned tenant and one other
    world.index.write_text(json.dumps(doc, indent=2))
    return world


def test_keep_alive_unloads_an_idle_tenant_and_load_and_unload_answer_when_done(four: World) -> None:
    world = four
    r = Resident(world)
    try:
        r.notify.wait(lambda m: "READY" in m)
        # keep_alive: served once, idle past 1s, paged out (reason idle); the pinned one never.
        assert ask(r, "idle")[0] == 200
        _wait_for(lambda: ("page-out", "idle", "idle") in _paged(world))
        assert not [p for p in _paged(world) if p[:2] == ("page-out", "pin")]
        metrics = httpx.get(r.url + "/metrics", timeout=30).text
        assert 'zoo:model_evictions_total{reason="idle",tenant="idle"} 1.0' in metrics
        # Measured beside the estimate (the worker's RAM read live: its runtime is most of it).
        ram = next(line for line in metrics.splitlines() if line.startswith('zoo:model_memory_bytes{kind="ram",tenant="pin"}'))
        assert float(ram.split()[-1]) > 10 << 20
        assert 'zoo:model_memory_bytes{kind="device",tenant="pin"} 0.0' in metrics  # CPU only
        memory = httpx.get(r.url + "/health", timeout=5).json()["tenants"]["pin"]["memory"]
        assert memory["estimate"] == footprint(world) and memory["measured"] > 0 and memory["ram"] > 10 << 20 and memory["device"] is None

        # load through the CLI: answered once it serves.
        loaded = world.run("resident", "load", "c")
        assert loaded.exit_code == 0, loaded.output
        assert loaded.output.startswith("c loaded in ")
        assert httpx.get(r.url + "/health", timeout=5).json()["tenants"]["c"]["state"] == "serving"

        # A load that would page out c is refused naming it, through the API and the CLI; nothing changes.
        refused = httpx.post(r.url + "/models/load", json={"model": "d"}, timeout=60)
        assert refused.status_code == 409 and refused.json()["error"]["evict"] == ["c"]
        cli = world.run("resident", "load", "d")
        assert cli.exit_code == 2 and "load d: loading d would page out c to make room; pass --evict to do it" in cli.output
        assert "Traceback" not in cli.output
        assert [p for p in _paged(world) if p[1] in ("c", "d")] == [("page-in", "c", "")]
        # With --evict it does.
        evicted = world.run("resident", "load", "d", "--evict")
        assert evicted.exit_code == 0 and "d loaded in " in evicted.output and "paging out c" in evicted.output, evicted.output
        assert ("page-out", "c", "budget") in _paged(world)

        # Unload of a busy tenant: its in-flight streaming request completes first; the answer comes after.
        pieces: list[str] = []
        started, finished = threading.Event(), threading.Event()

        def stream() -> None:
            body = {"model": "d", "prompt": "Once", "max_tokens": 480, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", r.url + "/v1/completions", json=body, timeout=120) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        pieces.append(line)
                        started.set()
            finished.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        busy = not finished.is_set()
        unloaded = httpx.post(r.url + "/models/unload", json={"model": "d"}, timeout=120)
        assert unloaded.status_code == 200, unloaded.text
        assert unloaded.json()["state"] == "paged_out" and busy, "the stream ended before the unload was asked"
        reader.join(120)
        assert pieces[-1] == "data: [DONE]" and not any('"error"' in p for p in pieces)
        assert json.loads(pieces[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert ("page-out", "d", "unload") in _paged(world)

        # Nothing to do, a pinned tenant, an unknown one: said in one line each.
        nothing = world.run("resident", "unload", "idle")
        assert nothing.exit_code == 0 and nothing.output.strip() == "idle is not loaded"
        pinned = world.run("resident", "unload", "pin")
        assert pinned.exit_code == 2 and "tenant 'pin' is pinned: it is never unloaded" in pinned.output
        ghost = world.run("resident", "unload", "ghost")
        assert ghost.exit_code == 2 and "tenant 'ghost' is not served by this host" in ghost.output
        # A request after an unload loads it again, as any request for a paged-out tenant does.
        assert ask(r, "d")[0] == 200
    finally:
        out = r.stop()
    assert "Traceback" not in out


def test_a_reload_under_the_budget_pages_out_an_idle_tenant_instead_of_stopping_the_old_version(world: World, tiny: dict[str, bytes]) -> None:
    """Issue #34: the end-to-end test saw ~10 s without answers while a stop-first reload waited for
    the old version to exit. With an idle tenant to page out, the new version loads beside the old."""
    world.artifact("m", "v1", tiny)
    world.artifact("n", "v1", tiny)

    def index(budget: str | None) -> None:
        doc = {"models": world.models, "loras": {}, "tenants": {"a": {"model": "m", **GEN}, "b": {"model": "n", **GEN}},
               "hosts": {"h": {"tenants": ["a", "b"], **({"memory_budget": budget} if budget else {})}}}  # fmt: skip
        world.index.write_text(json.dumps(doc, indent=2))

    index(None)
    assert world.run("apply").exit_code == 0
    budget = str(int(footprint(world) * 2.5))  # room for two tenants, not for three versions
    index(budget)
    r = Resident(world)
    try:
        r.notify.wait(lambda m: "READY" in m)
        assert ask(r, "b")[0] == 200 and ask(r, "a")[0] == 200  # both loaded; b least recently used
        files = dict(tiny)
        files["config.json"] = tiny["config.json"].replace(b"{", b'{"_v": 3,', 1)
        world.artifact("m", "v3", files)
        index(budget)
        assert world.run("apply").exit_code == 0
        reloaded = world.run("resident", "reload", "--timeout", "300")
        assert reloaded.exit_code == 0, reloaded.output
        lease = json.loads((world.root / "resident/tenants/a/lease.json").read_text())
        assert lease["swaps"][-1]["reason"] == "reload" and lease["swaps"][-1]["to"] == "v3"  # beside the old one, not stop-first
        assert ("page-out", "b", "budget") in _paged(world), r.tail()
        assert ask(r, "a")[1]["system_fingerprint"] == "m@v3"
    finally:
        out = r.stop()
    assert "Traceback" not in out
