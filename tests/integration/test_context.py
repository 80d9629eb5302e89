"""A transformers tenant's context is declared, not hidden (issue #33): ``resources.max_context`` is the
one number its 400s, its session budget, its measured KV budget and its ``/v1/models`` card use, and
an embedding tenant's inputs are held to it the same way. The llama.cpp twin is in test_llamacpp_resident.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.resident import Resident
from tests.support.world import World

pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")

pytestmark = pytest.mark.resident

CONTEXT = 64  # the generating tenant's declared max_context
INPUTS = 8  # the declared embedding tenant's
WORDS = "the cat sat on a mat while a dog ran far away"
SEQ_LENGTH = 16  # the embedder's own sentence_bert_config.json max_seq_length


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, bytes]) -> Iterator[Resident]:
    from zoo_agent.demo.tiny import build_tiny_embedder, sentence_transformers_layout

    tmp = tmp_path_factory.mktemp("context")
    embedder = sentence_transformers_layout(build_tiny_embedder(tmp / "embedder", WORDS, hidden=32), max_seq_length=SEQ_LENGTH)
    world = World(tmp / "world")
    world.artifact("m", "v1", tiny)
    world.artifact("e", "1", {str(p.relative_to(embedder)): p.read_bytes() for p in sorted(embedder.rglob("*")) if p.is_file()})
    tenants: dict[str, Any] = {
        # A default completion longer than the whole context: lowered to what each prompt leaves.
        "t": {"model": "m", "generation": {"temperature": 0, "max_tokens": 100}, "resources": {"max_context": CONTEXT, "max_batch": 2}},
        "e": {"model": "e", "kind": "embedding", "resources": {"max_context": INPUTS, "max_batch": 2}},
        "e-own": {"model": "e", "kind": "embedding", "resources": {"max_batch": 2}},  # declares none: the model's own
    }
    world.index.write_text(json.dumps({"models": world.models, "tenants": tenants, "hosts": {"h": {"tenants": list(tenants)}}}, indent=2))
    assert world.run("apply").exit_code == 0
    r = Resident(world)
    try:
        r.wait_ready()
        yield r
    finally:
        out = r.stop()
    assert "Traceback" not in out


def _chat(r: Resident, content: str, **kw: Any) -> httpx.Response:
    return httpx.post(r.url + "/v1/chat/completions", json={"model": "t", "messages": [{"role": "user", "content": content}], **kw}, timeout=60)


def _error(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def test_a_prompt_past_max_context_is_a_400_naming_messages_and_one_inside_it_is_answered(served: Resident) -> None:
    long = "hello there " * 40  # well past 64 tokens, not so long that it is refused before it is counted
    for response in (_chat(served, long), _chat(served, long, stream=True)):
        error = _error(response)
        assert error["param"] == "messages" and f"context of {CONTEXT} tokens" in error["message"], error
    completion = httpx.post(served.url + "/v1/completions", json={"model": "t", "prompt": long}, timeout=60)
    assert _error(completion)["param"] == "prompt"
    inside = _chat(served, "Hello", max_tokens=4)
    assert inside.status_code == 200 and inside.json()["usage"]["completion_tokens"] <= 4, inside.text


def test_max_tokens_past_what_the_prompt_leaves_is_a_400_and_the_default_is_lowered_to_it(served: Resident) -> None:
    prompt = _chat(served, "Hello", max_tokens=1).json()["usage"]["prompt_tokens"]
    left = CONTEXT - prompt
    error = _error(_chat(served, "Hello", max_tokens=left + 1))
    assert error["param"] == "max_tokens" and error["message"].endswith(f"at most {left}"), error
    assert _error(_chat(served, "Hello", max_tokens=CONTEXT))["param"] == "max_tokens"  # never fits: refused before counting
    full = _chat(served, "Hello", max_tokens=left, ignore_eos=True)
    assert full.status_code == 200 and full.json()["usage"]["completion_tokens"] == left, full.text
    default = _chat(served, "Hello", ignore_eos=True)  # the tenant's default (100) is more than the context holds
    assert default.status_code == 200, default.text
    assert default.json()["usage"]["completion_tokens"] == left and default.json()["choices"][0]["finish_reason"] == "length"


def test_a_session_keeps_what_fits_the_declared_context(served: Resident) -> None:
    words = "one two three four five six seven eight nine ten"
    first = _chat(served, words, max_tokens=8, session="ctx", ignore_eos=True)
    assert first.status_code == 200, first.text
    used = first.json()["usage"]["prompt_tokens"] + 8
    second = _chat(served, words, max_tokens=CONTEXT - used, session="ctx")  # the first turn and this one cannot both fit
    assert second.status_code == 200, second.text
    assert second.json()["x_zoo"]["session"]["dropped_turns"] == 1
    assert second.json()["usage"]["prompt_tokens"] + CONTEXT - used <= CONTEXT


def test_the_card_shows_and_the_kv_budget_counts_the_number_each_worker_holds_to(served: Resident) -> None:
    from zoo_agent.index.fit import kv_bytes, read_config

    cards = {c["id"]: c["x_zoo"]["max_context"] for c in httpx.get(served.url + "/v1/models", timeout=10).json()["data"]}
    assert cards == {"t": CONTEXT, "e": INPUTS, "e-own": SEQ_LENGTH}
    info = json.loads((served.root / "resident/tenants/t/model-info.json").read_text())
    config = read_config(served.root / "models/m/versions/v1")
    assert config is not None
    dtype = info["dtype"].removeprefix("torch.")
    assert info["footprint"]["kv"] == kv_bytes(config, dtype=dtype, max_batch=2, max_context=CONTEXT) > 0, info


@pytest.mark.parametrize(("tenant", "cap"), [("e", INPUTS), ("e-own", SEQ_LENGTH)])
def test_an_embedding_input_past_the_tenants_context_is_a_400_naming_input(served: Resident, tenant: str, cap: int) -> None:
    def embed(words: int) -> httpx.Response:
        return httpx.post(served.url + "/v1/embeddings", json={"model": tenant, "input": " ".join(["cat"] * words)}, timeout=60)

    fits, past = embed(cap), embed(cap + 1)  # the tiny embedder's tokenizer adds no special tokens
    assert fits.status_code == 200, fits.text
    error = _error(past)
    assert error["param"] == "input" and error["message"] == f"input: {cap + 1} tokens; this model embeds at most {cap} per text", error
