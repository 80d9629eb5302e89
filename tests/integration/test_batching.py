"""Continuous batching (issue #19): requests decoded together give the tokens each gives alone.

In-process (ASGI, the real app and engine, a tiny float32 model built here). To make a batch
certain rather than likely, the tests hold the engine with a `call` (which runs only when
nothing is in flight, and stops admission while it waits), queue the requests, then let go:
every queued request joins the same batch. The reference for "alone" is `generate()`, one
request at a time (`max_batch: 1`), so the engine is held to what transformers itself does.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")

from tests.support.lora import DESCRIPTIONS, adapter, backend  # noqa: E402

pytestmark = pytest.mark.resident

PROMPTS = ["Hello", "What is a model zoo?", "The zoo keeps every model pinned by its digest.", "Ask a question",
           "I am fine, thank you. And you?", "Adapters change how", "A host serves one tenant at a time. What is a", "x"]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zoo_agent.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("batching") / "model")


def plain_backend(model_dir: Path, sessions: Path | None = None) -> Any:
    from zoo_agent.resident.worker.backend import TransformersBackend

    b = TransformersBackend(model_dir, allow_pickle=False, allow_code=False, device="cpu")
    b.load()
    if sessions is not None:
        from zoo_agent.resident.sessions.store import Sessions

        b.sessions = Sessions(sessions, model_key="m@1", dtype=b.dtype, template=str(b.tokenizer.chat_template), vocab_size=b.vocab_size())
    return b


def chat(prompt: str, max_tokens: int, **kw: Any) -> dict[str, Any]:
    return {"model": "t", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "ignore_eos": True, **kw}


Client = Any


async def _serve(b: Any, max_batch: int, body: Callable[[Client, Any], Awaitable[Any]]) -> Any:
    import httpx

    from zoo_agent.resident.worker.app import ServingState, create_app

    state = ServingState("t", "m", "1", b, {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0}, max_batch=max_batch)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)), base_url="http://zoo", timeout=120) as client:
            return await body(client, state)
    finally:
        state.scheduler.close()


def serve(b: Any, max_batch: int, body: Callable[[Client, Any], Awaitable[Any]]) -> Any:
    return asyncio.run(_serve(b, max_batch, body))


async def held(state: Any, queued: int, requests: list[Awaitable[Any]]) -> list[Any]:
    """Start ``requests`` while the engine is held; let go once ``queued`` of them wait in its queue."""
    release = threading.Event()
    hold = state.scheduler.call(release.wait)
    tasks = [asyncio.ensure_future(r) for r in requests]
    deadline = time.monotonic() + 60  # bounded: requests are prepared in well under a second
    while state.scheduler.waiting < queued and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert state.scheduler.waiting == queued
    release.set()
    await asyncio.wrap_future(hold)
    return list(await asyncio.gather(*tasks))


async def answer(client: Client, body: dict[str, Any], path: str = "/v1/chat/completions") -> tuple[str, dict[str, Any]]:
    """(text, last document): a streamed answer is joined from its chunks."""
    if not body.get("stream"):
        r = await client.post(path, json=body)
        assert r.status_code == 200, r.text
        doc = r.json()
        choice = doc["choices"][0]
        return choice["message"]["content"] if "message" in choice else choice["text"], doc
    text, last = "", {}
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                last = json.loads(line[6:])
                assert "error" not in last, last
                delta = last["choices"][0].get("delta", {})
                text += delta.get("content") or last["choices"][0].get("text", "") or ""
    return text, last


def largest_batch(metrics: str) -> int:
    """The largest bucket bound below which some decode step's batch size fell (from /metrics)."""
    counts = {float(line.split('le="')[1].split('"')[0]): float(line.rsplit(" ", 1)[1])
              for line in metrics.splitlines() if line.startswith("zoo:decode_batch_size_bucket") and "+Inf" not in line}  # fmt: skip
    total = float(next(line.rsplit(" ", 1)[1] for line in metrics.splitlines() if line.startswith("zoo:decode_batch_size_count")))
    return int(min(bound for bound, n in counts.items() if n == total))


def alone(b: Any, bodies: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Each request by itself with generate() (max_batch 1): the reference."""

    async def run(client: Client, state: Any) -> list[tuple[str, dict[str, Any]]]:
        return [await answer(client, body) for body in bodies]

    return list(serve(b, 1, run))


def test_eight_concurrent_greedy_requests_return_exactly_what_each_returns_alone(model_dir: Path) -> None:
    b = plain_backend(model_dir)
    # Different prompts and lengths, streamed and not, some that may stop at end-of-sequence.
    bodies = [chat(p, 6 + 5 * i, stream=i % 2 == 0, ignore_eos=i % 3 != 0) for i, p in enumerate(PROMPTS)]
    reference = alone(b, bodies)

    async def run(client: Client, state: Any) -> tuple[list[Any], str]:
        results = await held(state, len(bodies), [answer(client, body) for body in bodies])
        return results, (await client.get("/metrics")).text

    batched, metrics = serve(b, 8, run)
    for (ref_text, ref), (text, doc), body in zip(reference, batched, bodies, strict=True):
        assert text == ref_text, body
        if not body["stream"]:
            assert doc["usage"] == ref["usage"] and doc["choices"][0]["finish_reason"] == ref["choices"][0]["finish_reason"]
    assert largest_batch(metrics) == 8  # they really were decoded together
    assert "zoo:num_requests_running 0.0" in metrics


def test_requests_join_and_leave_a_running_batch(model_dir: Path) -> None:
    b = plain_backend(model_dir)
    first = [chat(p, 40 if i == 0 else 4 + 3 * i) for i, p in enumerate(PROMPTS[:4])]
    later = [chat(p, 5 + 2 * i, stream=True) for i, p in enumerate(PROMPTS[4:])]
    reference = alone(b, first + later)

    async def run(client: Client, state: Any) -> list[Any]:
        tasks = [asyncio.ensure_future(answer(client, body)) for body in first]
        deadline = time.monotonic() + 60
        while state.scheduler.running < 4 and time.monotonic() < deadline:  # the first four are decoding
            await asyncio.sleep(0.005)
        tasks += [asyncio.ensure_future(answer(client, body)) for body in later]  # these join mid-batch
        return list(await asyncio.gather(*tasks))

    batched = serve(b, 8, run)
    assert [text for text, _ in batched] == [text for text, _ in reference]


def test_a_client_that_leaves_mid_batch_stops_only_its_own_sequence(model_dir: Path) -> None:
    """Over real HTTP (uvicorn on loopback): httpx's in-process transport buffers whole bodies, so
    a client going away mid-stream is only seen through a real connection."""
    import httpx
    import uvicorn

    from zoo_agent.resident.worker.app import ServingState, create_app

    b = plain_backend(model_dir)
    bodies = [chat(p, 24) for p in PROMPTS[:5]]
    reference = alone(b, bodies)
    state = ServingState("t", "m", "1", b, {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0}, max_batch=8)
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        url = "http://127.0.0.1:%d" % server.servers[0].sockets[0].getsockname()[1]
        texts: dict[int, str] = {}

        def ask(i: int) -> None:
            r = httpx.post(url + "/v1/chat/completions", json=bodies[i], timeout=120)
            texts[i] = r.json()["choices"][0]["message"]["content"]

        def leave() -> None:
            with httpx.stream("POST", url + "/v1/chat/completions", json=chat("Hello", 400, stream=True), timeout=120) as r:
                for n, _ in enumerate(line for line in r.iter_lines() if line.startswith("data: {")):
                    if n == 3:
                        return  # the client goes away after the first pieces

        release = threading.Event()
        hold = state.scheduler.call(release.wait)
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)] + [threading.Thread(target=leave)]
        for t in threads:
            t.start()
        while state.scheduler.waiting < 6 and time.monotonic() < deadline + 30:
            time.sleep(0.01)
        release.set()
        hold.result(timeout=30)
        for t in threads:
            t.join(timeout=120)
        while state.scheduler.running and time.monotonic() < deadline + 60:
            time.sleep(0.01)
        metrics = httpx.get(url + "/metrics", timeout=30).text
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        state.scheduler.close()
    assert [texts[i] for i in range(5)] == [text for text, _ in reference]
    assert "zoo:request_cancelled_total 1.0" in metrics
    generated = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("zoo:generation_tokens_total")))
    assert generated < 5 * 24 + 100  # the leaver's 400 tokens were not all generated


def test_seeded_sampling_gives_the_same_text_in_a_batch_as_alone(model_dir: Path) -> None:
    """Each sequence draws from its own generator, so a seed means the same tokens however the batch is made."""
    b = plain_backend(model_dir)
    bodies = [chat(p, 16, temperature=0.9, top_p=0.95, seed=7 + i) for i, p in enumerate(PROMPTS[:6])]

    async def one_by_one(client: Client, state: Any) -> list[Any]:
        return [await answer(client, body) for body in bodies]

    async def together(client: Client, state: Any) -> list[Any]:
        return await held(state, len(bodies), [answer(client, body) for body in bodies])

    first = [text for text, _ in serve(b, 8, one_by_one)]
    assert [text for text, _ in serve(b, 8, together)] == first
    assert len(set(first)) > 1


def test_mixed_adapters_in_one_batch_never_leak(built: dict[str, Path]) -> None:
    b = backend(built, tuple(adapter(built, a) for a in DESCRIPTIONS))
    order = ["code", None, "legal", "terse", "code", None, "terse", "legal"]
    bodies = [{**chat("Hello there", 12), "model": f"t:{a}" if a else "t"} for a in order]
    reference = alone(b, bodies)
    assert len({text for text, _ in reference}) == 4  # base and three adapters all differ

    async def run(client: Client, state: Any) -> tuple[list[Any], str]:
        results = await held(state, len(bodies), [answer(client, body) for body in bodies])
        return results, (await client.get("/metrics")).text

    batched, metrics = serve(b, 8, run)
    for aid, (text, doc), (ref_text, _) in zip(order, batched, reference, strict=True):
        assert text == ref_text, aid
        assert doc.get("x_zoo", {}).get("adapter") == (f"{aid}@1" if aid else None)
    assert largest_batch(metrics) == 8


def test_an_adapter_that_needs_a_running_adapters_slot_waits_for_it(built: dict[str, Path]) -> None:
    """max_loras 1: a request for another adapter is not admitted (it would evict the running one); it runs after."""
    b = backend(built, tuple(adapter(built, a) for a in DESCRIPTIONS), max_loras=1)
    bodies = [{**chat("Hello there", 12), "model": f"t:{a}"} for a in ("code", "terse", "code", "legal")]
    reference = alone(b, bodies)

    async def run(client: Client, state: Any) -> list[Any]:
        return await held(state, len(bodies), [answer(client, body) for body in bodies])

    assert [text for text, _ in serve(b, 8, run)] == [text for text, _ in reference]


def test_a_session_turn_restored_from_its_cache_joins_fresh_requests(model_dir: Path, tmp_path: Path) -> None:
    turns = ["Hello, I am Ada.", "What is a model zoo?"]
    b = plain_backend(model_dir, tmp_path / "alone")

    async def session_alone(client: Client, state: Any) -> list[Any]:
        return [await answer(client, chat(t, 12, session="s")) for t in turns]

    reference = serve(b, 1, session_alone)
    assert reference[1][1]["x_zoo"]["session"]["cache"] == "restored"
    fresh = [chat(p, 10 + i) for i, p in enumerate(PROMPTS[:5])]
    fresh_reference = alone(b, fresh)

    b2 = plain_backend(model_dir, tmp_path / "batched")

    async def session_in_batch(client: Client, state: Any) -> list[Any]:
        first = await answer(client, chat(turns[0], 12, session="s"))
        rest = await held(state, 6, [answer(client, chat(turns[1], 12, session="s"))] + [answer(client, body) for body in fresh])
        return [first, *rest]

    batched = serve(b2, 8, session_in_batch)
    assert [text for text, _ in batched[:2]] == [text for text, _ in reference]
    assert batched[1][1]["x_zoo"]["session"] == reference[1][1]["x_zoo"]["session"]  # restored, the same cached tokens
    assert [text for text, _ in batched[2:]] == [text for text, _ in fresh_reference]
    # The transcript was committed with the same completion ids either way.
    a, c = (json.loads((tmp_path / d / "sessions" / "s.json").read_text()) for d in ("alone", "batched"))
    assert [t["completion_ids"] for t in a["turns"]] == [t["completion_ids"] for t in c["turns"]]


def test_a_request_past_the_context_names_the_field(model_dir: Path) -> None:
    b = plain_backend(model_dir)  # the tiny model's context: 4096 positions

    async def run(client: Client, state: Any) -> list[Any]:
        state.max_context = 100_000  # declared past the model's positions: those limit here
        too_long = await client.post("/v1/chat/completions", json=chat("Hello", 4096))
        huge_prompt = await client.post("/v1/chat/completions", json=chat("Hello, how are you? " * 1000, 8))
        fits = await client.post("/v1/chat/completions", json=chat("Hello", 8))
        return [too_long, huge_prompt, fits]

    too_long, huge_prompt, fits = serve(b, 8, run)
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
    assert "passes the context of 4096 tokens (resources.max_context); at most" in too_long.json()["error"]["message"]
    assert huge_prompt.status_code == 400 and huge_prompt.json()["error"]["param"] == "messages"
    assert "tokens do not fit the context of 4096 tokens" in huge_prompt.json()["error"]["message"]
    assert fits.status_code == 200


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_it_is_tokenized(model_dir: Path) -> None:
    """The tiny tokenizer is a byte-level BPE: its longest token bounds the characters a token covers."""
    b = plain_backend(model_dir)
    longest = b.longest_token()
    assert longest is not None
    counted: list[int] = []
    count = b.count_tokens
    b.count_tokens = lambda request: counted.append(1) or count(request)

    async def run(client: Client, state: Any) -> list[Any]:
        return [await client.post("/v1/chat/completions", json=chat("y" * (4096 * longest + 1), 8)),
                await client.post("/v1/chat/completions", json=chat("Hello", 8))]  # fmt: skip

    refused, fits = serve(b, 1, run)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages", refused.text
    assert "more than 4096 tokens can hold" in refused.json()["error"]["message"] and fits.status_code == 200
    assert counted == [1]  # the request that fits, and only it, was tokenized


def test_a_hung_model_is_seen_as_stalled_only_while_it_has_work(model_dir: Path) -> None:
    """The worker stops answering pings while `stalled` (so the watchdog starves and the worker is
    replaced); an idle engine, however long idle, is never stalled."""
    from zoo_agent.resident.engine.base import Generated, Request
    from zoo_agent.resident.engine.batcher import Batcher

    b = plain_backend(model_dir)
    engine = Batcher(b, max_batch=4)
    try:
        time.sleep(0.3)
        assert not engine.stalled(0.1)  # idle
        entered, release = threading.Event(), threading.Event()
        real_forward = b.model.forward

        def hanging(*args: Any, **kwargs: Any) -> Any:
            entered.set()
            release.wait(60)
            return real_forward(*args, **kwargs)

        b.model.forward = hanging
        done = threading.Event()
        engine.submit(Request(None, "Hello", 4, 0.0, 1.0), Generated(), threading.Event(),
                      lambda item: done.set() if isinstance(item, (Generated, BaseException)) else None)  # fmt: skip
        assert entered.wait(30)
        time.sleep(0.3)
        assert engine.stalled(0.1)
        b.model.forward = real_forward
        release.set()
        assert done.wait(30)
        assert not engine.stalled(0.1)
    finally:
        engine.close()


def test_a_stream_can_end_with_its_usage(model_dir: Path) -> None:
    """OpenAI's stream_options.include_usage: a last chunk with no choices carries the counts."""

    async def run(client: Client, state: Any) -> list[dict[str, Any]]:
        body = {**chat("Hello", 7, stream=True), "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            return [json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: {")]

    chunks = serve(plain_backend(model_dir), 8, run)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 7
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-2]
