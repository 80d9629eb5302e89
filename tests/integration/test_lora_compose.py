"""Adapter assembly for `<tenant>:auto` (issue #21): up to max_adapters adapters above the
threshold answer together, exactly as peft composes them; only declared, unrefused adapters
are ever composed; max_adapters 1 is the single choice of issue #6.

Uses the tiny model, adapters and bag-of-words embedder of the ``built`` fixture (THRESHOLD 0.4,
tests/support/lora.py).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("peft", reason="the resident extra is not installed (pip install -e .[resident])")

from tests.support.lora import THRESHOLD, adapter, backend, call, generated_ids, peft_ids  # noqa: E402
from zoo_agent.resident.engine.base import AUTO  # noqa: E402

pytestmark = pytest.mark.resident

# Bag-of-words similarities (test_lora's embedder): terse 0.66, code 0.65, legal 0.11.
TWO = "review python code for bugs and answer tersely in one short line"
# terse 0.57, code 0.43, legal 0.32: two pass 0.4, three pass 0.3.
THREE = "review python code tersely in one short line about legal contracts clauses"
ALL = ("code", "terse", "legal")


def ask(text: str, model: str = "t:auto", tokens: int = 12) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": tokens, "ignore_eos": True}


def served(b: Any, bodies: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The answers to ``bodies``, asked one after the other, and the /metrics they leave."""
    import httpx

    from zoo_agent.resident.worker.app import ServingState, create_app

    async def run() -> tuple[list[dict[str, Any]], str]:
        state = ServingState("t", "m", "1", b, {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)), base_url="http://zoo", timeout=60) as client:
            responses = [await client.post("/v1/chat/completions", json=body) for body in bodies]
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
            return [r.json() for r in responses], (await client.get("/metrics")).text

    return asyncio.run(run())


def post(b: Any, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return served(b, bodies)[0]


@pytest.fixture(scope="module", params=["sum", "weighted"])
def composing(request: pytest.FixtureRequest, built: dict[str, Path]) -> Any:
    """All three adapters declared, threshold 0.3: THREE composes all of them."""
    return backend(built, tuple(adapter(built, a) for a in ALL), threshold=0.3, max_adapters=3, combine=request.param)


def test_a_composition_answers_as_peft_composes_the_same_adapters(built: dict[str, Path], composing: Any) -> None:
    combine = composing.worker.selection.combine
    with generated_ids(composing) as ids:
        (body,) = post(composing, [ask(THREE)])
    x = body["x_zoo"]
    assert [a["id"] for a in x["adapters"]] == ["terse", "code", "legal"] and x["combine"] == combine
    assert x["similarity"] == x["adapters"][0]["similarity"] and [a["similarity"] for a in x["adapters"]] == [0.5701, 0.4296, 0.3192]
    weights = tuple(a["weight"] for a in x["adapters"]) if combine == "weighted" else ()
    if combine == "weighted":  # the similarities normalised (0.43, 0.32, 0.24), in steps of 0.05
        assert weights == (0.45, 0.3, 0.25) and x["adapter"] == "terse@1*0.45+code@1*0.3+legal@1*0.25"
    else:
        assert all("weight" not in a for a in x["adapters"]) and x["adapter"] == "terse@1+code@1+legal@1"
    expected = peft_ids(built, ("terse", "code", "legal"), combine=combine, weights=weights, messages=ask(THREE)["messages"])
    assert ids[THREE] == expected
    with generated_ids(composing) as serial:  # one generate() at a time (max_batch 1): the same composition
        greedy_text(composing, THREE, AUTO)
    assert serial[THREE] == expected
    singles = [peft_ids(built, (aid,), messages=ask(THREE)["messages"]) for aid in ALL]
    assert all(expected != single for single in singles)  # the composition is none of its adapters alone


async def _queued_together(b: Any, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every request waits in the engine's queue before any is admitted (a call holds the engine),
    so the engine decides, in one admission, which of them share a batch."""
    import httpx

    from zoo_agent.resident.worker.app import ServingState, create_app

    state = ServingState("t", "m", "1", b, {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0})
    gate = threading.Event()
    state.scheduler.call(gate.wait)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)), base_url="http://zoo", timeout=60) as client:
        sent = [asyncio.ensure_future(client.post("/v1/chat/completions", json=body)) for body in bodies]
        while state.waiting < len(bodies) and not any(f.done() for f in sent):
            await asyncio.sleep(0.01)
        gate.set()
        responses = await asyncio.gather(*sent)
    state.scheduler.close()
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json() for r in responses]


def test_a_composition_batched_with_other_adapters_keeps_every_row_its_own(composing: Any) -> None:
    """"weighted" rows mix with the others through peft's adapter_names; "sum" rows are decoded
    in a batch of their own. Either way each row generates what it generates alone."""
    bodies = [ask(THREE), ask("Hello there", "t:code"), ask(TWO), ask("Hello", "t"), ask("Hi there", "t:legal")]
    with generated_ids(composing) as alone:
        answers = [post(composing, [body])[0] for body in bodies]
    with generated_ids(composing) as together:
        batched = asyncio.run(_queued_together(composing, bodies))
    assert together == alone and len(together) == len(bodies)
    assert [r.get("x_zoo") for r in batched] == [r.get("x_zoo") for r in answers]
    assert batched[2]["x_zoo"]["adapters"][0]["id"] == "terse" and len(batched[2]["x_zoo"]["adapters"]) == 2  # TWO: terse+code


def test_an_undeclared_adapter_is_never_composed_in(built: dict[str, Path]) -> None:
    """'legal' is on disk (its files beside the others) and named in the request, but not declared."""
    from zoo_agent.errors import AdapterError
    from zoo_agent.resident.worker.selection import Composition

    b = backend(built, (adapter(built, "code"), adapter(built, "terse")), threshold=0.0, max_adapters=3)
    text = "legal " + THREE + " legal contracts clauses and liability law"
    (body,) = post(b, [ask(text)])
    assert {a["id"] for a in body["x_zoo"]["adapters"]} == {"code", "terse"}
    assert "legal" not in b.adapters.peft.peft_config
    status, error = asyncio.run(call(b, [("POST", "/v1/chat/completions", ask(text, "t:legal"))]))[0]
    assert status == 404 and error["error"]["code"] == "model_not_found"
    with pytest.raises(AdapterError, match=r"^adapter 'legal' is not declared for this tenant \(declared: code, terse\)$"):
        b.adapters.compose(Composition(("code", "legal"), "sum"))
    assert "legal" not in b.adapters.peft.peft_config and "legal" not in b.adapters.loaded


def test_a_refused_adapter_is_never_composed_in(built: dict[str, Path], tmp_path: Path) -> None:
    from zoo_agent.errors import AdapterError
    from zoo_agent.resident.worker.selection import Composition

    bad = tmp_path / "terse"
    shutil.copytree(built["terse"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    terse = adapter(built, "terse").model_copy(update={"dir": bad})
    b = backend(built, (adapter(built, "code"), terse), threshold=THRESHOLD, max_adapters=3)
    assert set(b.adapters.refused) == {"terse"}
    (body,) = post(b, [ask(TWO)])
    assert body["x_zoo"]["adapter"] == "code@1" and "adapters" not in body["x_zoo"]  # terse (0.66) refused: code alone
    with pytest.raises(AdapterError, match=r"^adapter 'terse' is refused, so it is never composed: terse@1: adapter_config.json: r is 8"):
        b.adapters.compose(Composition(("code", "terse"), "weighted", (0.5, 0.5)))


def test_max_adapters_1_chooses_one_adapter_as_before(built: dict[str, Path]) -> None:
    b = backend(built, tuple(adapter(built, a) for a in ALL), threshold=THRESHOLD, max_adapters=1)
    (body,), metrics = served(b, [ask(TWO)])
    assert body["x_zoo"] == {"adapter": "terse@1", "similarity": 0.6609}
    assert body["choices"][0]["message"]["content"] == greedy_text(b, TWO, "terse")
    assert not b.adapters.compositions
    assert 'zoo:lora_selections_total{adapter="terse@1"} 1.0' in metrics and "zoo:lora_composition_requests_total{" not in metrics


def greedy_text(b: Any, text: str, aid: str | None) -> str:
    from zoo_agent.resident.engine.base import Generated, Request

    return str(b.complete(Request([{"role": "user", "content": text}], None, 12, 0.0, 1.0, adapter=aid, ignore_eos=True), Generated()))


@pytest.mark.parametrize(("threshold", "expected"), [(0.6, None), (0.4, ["terse", "code"]), (0.3, ["terse", "code", "legal"])])
def test_the_threshold_leaves_out_adapters_below_it(built: dict[str, Path], threshold: float, expected: list[str] | None) -> None:
    b = backend(built, tuple(adapter(built, a) for a in ALL), threshold=threshold, max_adapters=3)
    (body,), metrics = served(b, [ask(THREE)])
    x = body["x_zoo"]
    if expected is None:  # none passes: the base model answers, as with one adapter
        assert x == {"adapter": None, "similarity": 0.5701} and body["choices"][0]["message"]["content"] == greedy_text(b, THREE, None)
        return
    assert [a["id"] for a in x["adapters"]] == expected and all(a["similarity"] >= threshold for a in x["adapters"])
    series = ",".join(sorted(f"{a}@1" for a in expected))
    assert f'zoo:lora_composition_requests_total{{adapters="{series}",combine="sum"}} 1.0' in metrics
    assert all(f'zoo:lora_selections_total{{adapter="{a}@1"}} 1.0' in metrics for a in expected)


def test_compositions_are_cached_lru_never_evicting_a_busy_one_and_dropped_with_their_adapters(built: dict[str, Path]) -> None:
    from zoo_agent.resident.engine.base import AdaptersBusy
    from zoo_agent.resident.worker.selection import Composition

    b = backend(built, tuple(adapter(built, a) for a in ALL), max_loras=3)
    a = b.adapters
    made = [Composition(pair, "weighted", (0.5, 0.5)) for pair in (("code", "terse"), ("code", "legal"), ("terse", "legal"))]
    names = [a.compose(c) for c in made]
    assert list(a.compositions) == names and a.stats.compositions_built == 3
    assert a.compose(made[0]) == names[0] and a.stats.compositions_built == 3  # cached: not built again, now most recent
    fourth = Composition(("legal", "code"), "weighted", (0.6, 0.4))
    with pytest.raises(AdaptersBusy):
        a.compose(fourth, busy=frozenset(names))
    a.compose(fourth, busy=frozenset(names[:1]))  # the least recently used one not busy makes room
    assert list(a.compositions) == [names[2], names[0], fourth.name] and names[1] not in a.peft.peft_config
    summed = a.compose(Composition(("code", "terse"), "sum"), busy=frozenset([names[0], fourth.name]))
    assert a.exclusive(summed) and not a.exclusive(names[0]) and not a.exclusive("code")
    # A sum composition running pins its adapters: loading another may not unload them.
    a.unload("legal")
    assert [c.ids for c in a.compositions.values()] == [("code", "terse"), ("code", "terse")]  # legal's are gone
    a.max_loras = 2
    with pytest.raises(AdaptersBusy):
        a.load("legal", busy=frozenset([summed]))
    # A new version of an adapter drops the compositions made with it; so does its leaving the index, loaded or not.
    b.update_adapters((adapter(built, "code", source="legal", version="2", rank=8), adapter(built, "terse"), adapter(built, "legal")))
    assert not a.compositions and all(not n.startswith("compose-") for n in a.peft.peft_config)
    a.max_loras = 3
    kept = a.compose(Composition(("terse", "legal"), "weighted", (0.5, 0.5)))
    a._evict("legal")  # LRU: unloaded to make room, the composition keeps its own weights
    assert kept in a.compositions
    b.update_adapters((adapter(built, "code", source="legal", version="2", rank=8), adapter(built, "terse")))
    assert not a.compositions and kept not in a.peft.peft_config


def test_a_composition_continues_a_session_only_from_its_own_cache(built: dict[str, Path], tmp_path: Path) -> None:
    """The session cache is keyed by what answered: a composition's label, never one of its adapters'."""
    from zoo_agent.resident.sessions.store import Sessions

    b = backend(built, tuple(adapter(built, a) for a in ALL), threshold=THRESHOLD, max_adapters=3)
    b.sessions = Sessions(tmp_path, model_key="m@1", dtype=b.dtype, template=str(b.tokenizer.chat_template), vocab_size=b.vocab_size())
    first = post(b, [{**ask(TWO), "session": "s1"}])[0]
    assert first["x_zoo"]["session"]["cache"] == "none"
    second = post(b, [{**ask(TWO), "session": "s1"}])[0]
    assert second["x_zoo"]["adapter"] == first["x_zoo"]["adapter"] and second["x_zoo"]["session"]["cache"] == "restored"
