"""Priority scheduling (issue #20) on a real tiny model: waiting requests are served best class
first, FIFO within a class, aged so that ``batch`` is never starved; with batching, priority
decides admission into the running batch.

As in test_batching, the engine is held with a ``call`` (it runs only when nothing is in
flight, and admission waits for it) so that every request is certainly waiting before any is
served. The order of service is read from the order the requests' summaries are emitted, and
the waiting time that aging counts comes from an injected clock: nothing depends on how fast
this machine is.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")

pytestmark = pytest.mark.resident

DEFAULTS = {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0}


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from zoo_agent.demo.tiny import build_tiny_model
    from zoo_agent.resident.worker.backend import TransformersBackend

    b = TransformersBackend(build_tiny_model(tmp_path_factory.mktemp("priority") / "model"), allow_pickle=False, allow_code=False, device="cpu")
    b.load()
    return b


def make(kind: str, backend: Any, aging_seconds: float = 10.0) -> Any:
    """``serial``: one generate() at a time; ``batcher1``/``batcher2``: the batching engine with room for 1 or 2."""
    from zoo_agent.resident.engine.batcher import Batcher
    from zoo_agent.resident.engine.serial import Serial

    if kind == "serial":
        return Serial(backend, aging_seconds=aging_seconds)
    return Batcher(backend, max_batch=int(kind[-1]), aging_seconds=aging_seconds)


@pytest.fixture(params=["serial", "batcher1"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def req(priority: int, prompt: str = "Hello") -> Any:
    from zoo_agent.resident.engine.base import Request

    return Request(None, prompt, 4, 0.0, 1.0, ignore_eos=True, priority=priority)


def served_order(scheduler: Any, requests: list[tuple[str, Any]], clock: Iterator[float] | None = None) -> list[str]:
    """Submit ``requests`` while the scheduler is held, let go, and return their tags in the order
    they finished (with one served at a time: the order they were served). ``clock`` gives each
    submission's arrival time."""
    from zoo_agent.resident.engine.base import Generated

    done: list[str] = []
    lock, finished = threading.Lock(), threading.Event()

    def emitter(tag: str) -> Any:
        def emit(item: Any) -> None:
            if isinstance(item, (Generated, BaseException)):
                with lock:
                    done.append(tag if isinstance(item, Generated) else f"{tag} failed: {item!r}")
                    if len(done) == len(requests):
                        finished.set()

        return emit

    release = threading.Event()
    hold = scheduler.call(release.wait)
    now = [0.0]
    if clock is not None:
        scheduler.clock = lambda: now[0]
    try:
        for tag, request in requests:
            if clock is not None:
                now[0] = next(clock)
            scheduler.submit(request, Generated(), threading.Event(), emitter(tag), stream=False)
        assert scheduler.waiting == len(requests)
    finally:
        release.set()
    hold.result(timeout=60)
    assert finished.wait(120), done
    return done


def test_a_realtime_request_is_served_before_the_batch_requests_queued_ahead_of_it(backend: Any, kind: str) -> None:
    scheduler = make(kind, backend)
    try:
        order = served_order(scheduler, [(f"batch{i}", req(1)) for i in range(3)] + [("realtime", req(-1))])
    finally:
        scheduler.close()
    assert order == ["realtime", "batch0", "batch1", "batch2"]  # best class first, then FIFO


def test_classes_then_fifo_within_each(backend: Any, kind: str) -> None:
    scheduler = make(kind, backend, aging_seconds=0)
    plan = [("b0", 1), ("d0", 0), ("r0", -1), ("b1", 1), ("s0", -2), ("d1", 0), ("r1", -1)]
    try:
        order = served_order(scheduler, [(tag, req(p)) for tag, p in plan])
    finally:
        scheduler.close()
    assert order == ["s0", "r0", "r1", "d0", "d1", "b0", "b1"]


def test_priority_decides_admission_into_the_running_batch(backend: Any) -> None:
    """Room for two: the realtime request and the oldest batch one join first; the rest wait for a free row."""
    scheduler = make("batcher2", backend)
    try:
        order = served_order(scheduler, [(f"batch{i}", req(1)) for i in range(3)] + [("realtime", req(-1))])
    finally:
        scheduler.close()
    assert set(order[:2]) == {"realtime", "batch0"}  # decoded together, the same length: they finish in one step
    assert set(order[2:]) == {"batch1", "batch2"}


@pytest.mark.parametrize(
    ("aging_seconds", "fresh_arrival", "first"),
    [
        (10.0, 100.0, "batch"),  # waited ten classes' worth before the default one came: it goes first
        (10.0, 5.0, "default"),  # waited half a class: the fresh default one still goes first
        (0.0, 100.0, "default"),  # aging off: class alone decides
    ],
)
def test_an_aged_batch_request_is_admitted_before_a_fresh_default_one(backend: Any, kind: str, aging_seconds: float, fresh_arrival: float,
                                                                      first: str) -> None:  # fmt: skip
    scheduler = make(kind, backend, aging_seconds=aging_seconds)
    try:
        order = served_order(scheduler, [("batch", req(1)), ("default", req(0))], clock=iter([0.0, fresh_arrival]))
    finally:
        scheduler.close()
    assert order[0] == first


def test_a_cancelled_waiting_request_is_skipped_and_counted(backend: Any, kind: str) -> None:
    from zoo_agent.resident.engine.base import Generated

    scheduler = make(kind, backend)
    release, seen = threading.Event(), list[Any]()
    try:
        hold = scheduler.call(release.wait)
        gone = threading.Event()
        scheduler.submit(req(-1), Generated(), gone, seen.append, stream=False)
        gone.set()  # its client went away while it waited
        assert scheduler.waiting_by_class() == {"system": 0, "realtime": 1, "default": 0, "batch": 0}
        release.set()
        hold.result(timeout=60)
        done = threading.Event()
        scheduler.submit(req(1), Generated(), threading.Event(), lambda item: done.set() if isinstance(item, Generated) else None, stream=False)
        assert done.wait(60)
        assert scheduler.stats.cancelled == 1 and not any(isinstance(item, Generated) for item in seen)
        assert scheduler.waiting == 0 and scheduler.waiting_by_class() == dict.fromkeys(["system", "realtime", "default", "batch"], 0)
    finally:
        release.set()
        scheduler.close()


# -- the HTTP API -------------------------------------------------------------------------------


def _chat(**kw: Any) -> dict[str, Any]:
    return {"model": "t", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, **kw}


def _gauge(metrics: str, name: str) -> float:
    line = next(line for line in metrics.splitlines() if line.startswith(f'zoo:num_requests_waiting_by_priority{{priority="{name}"}}'))
    return float(line.rsplit(" ", 1)[1])


@pytest.mark.parametrize("max_batch", [1, 4])
def test_the_api_takes_the_header_and_the_field_and_the_metric_counts_by_class(backend: Any, max_batch: int) -> None:
    import httpx

    from zoo_agent.resident.worker.app import ServingState, create_app

    state = ServingState("t", "m", "1", backend, dict(DEFAULTS), max_batch=max_batch, priority=1)  # the tenant's default: batch

    async def run() -> tuple[str, list[httpx.Response], str]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)), base_url="http://zoo", timeout=120) as client:
            release = threading.Event()
            hold = state.scheduler.call(release.wait)
            try:
                posts = [
                    client.post("/v1/chat/completions", json=_chat(), headers={"X-Zoo-Priority": "batch"}),
                    client.post("/v1/chat/completions", json=_chat()),  # the tenant's default
                    client.post("/v1/completions", json={"model": "t", "prompt": "Hi", "max_tokens": 2, "priority": -1}),  # vLLM's field
                    client.post("/v1/chat/completions", json=_chat(priority=1), headers={"x-zoo-priority": "Realtime"}),  # the header wins
                ]
                tasks = [asyncio.ensure_future(p) for p in posts]
                deadline = time.monotonic() + 60
                while state.scheduler.waiting < len(tasks) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                held = (await client.get("/metrics")).text
            finally:
                release.set()
            await asyncio.wrap_future(hold)
            responses = list(await asyncio.gather(*tasks))
            return held, responses, (await client.get("/metrics")).text

    try:
        held, responses, after = asyncio.run(run())
    finally:
        state.scheduler.close()
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert "zoo:num_requests_waiting 4.0" in held
    assert {name: _gauge(held, name) for name in ("system", "realtime", "default", "batch")} == {"system": 0, "realtime": 2, "default": 0, "batch": 2}
    assert all(_gauge(after, name) == 0 for name in ("system", "realtime", "default", "batch"))


@pytest.mark.parametrize(
    ("headers", "extra", "param", "words"),
    [
        ({"X-Zoo-Priority": "urgent"}, {}, "X-Zoo-Priority", ["X-Zoo-Priority", "system, realtime, default, batch"]),
        ({"X-Zoo-Priority": "-1"}, {}, "X-Zoo-Priority", ["X-Zoo-Priority"]),
        ({}, {"priority": "high"}, "priority", ["priority"]),
        ({}, {"priority": True}, "priority", ["priority"]),
        ({}, {"priority": 1.5}, "priority", ["priority"]),
        ({}, {"priority": 5000}, "priority", ["priority", "1000"]),
        ({}, {"priority": -5000}, "priority", ["priority", "-2"]),
        ({}, {"priority": -3}, "priority", ["priority", "-2"]),  # ranked above system: no such class (issue #31)
    ],
)
def test_a_bad_priority_is_a_400_naming_it(backend: Any, headers: dict[str, str], extra: dict[str, Any], param: str, words: list[str]) -> None:
    from fastapi.testclient import TestClient

    from zoo_agent.resident.worker.app import ServingState, create_app

    state = ServingState("t", "m", "1", backend, dict(DEFAULTS), max_batch=1)
    try:
        with TestClient(create_app(state)) as client:
            for path, body in (("/v1/chat/completions", _chat(**extra)), ("/v1/completions", {"model": "t", "prompt": "Hi", **extra})):
                r = client.post(path, json=body, headers=headers)
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert error["param"] == param and error["type"] == "invalid_request_error", error
                for word in words:
                    assert word in error["message"], error
    finally:
        state.scheduler.close()


def test_the_schema_documents_the_header_and_the_field(backend: Any) -> None:
    from fastapi.testclient import TestClient

    from zoo_agent.resident.worker.app import ServingState, create_app

    state = ServingState("t", "m", "1", backend, dict(DEFAULTS), max_batch=1)
    try:
        with TestClient(create_app(state)) as client:
            schema = client.get("/openapi.json").json()
    finally:
        state.scheduler.close()
    for path in ("/v1/chat/completions", "/v1/completions"):
        params = schema["paths"][path]["post"]["parameters"]
        assert [(p["name"], p["in"]) for p in params] == [("X-Zoo-Priority", "header")]
    prop = schema["components"]["schemas"]["ChatBody"]["properties"]["priority"]
    assert "realtime -1" in prop["description"]
