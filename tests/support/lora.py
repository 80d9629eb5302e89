"""LoRA helpers (issue #6, #21): the adapters a tiny model gets, a loaded backend offering them,
greedy answers, peft's own composition as the reference, requests through the worker's app.
The models themselves are built by the ``built`` fixture (tests/integration/conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from zoo_agent.resident.config import AdapterConfig, SelectionConfig, WorkerConfig


PROMPT = [{"role": "user", "content": "Hello there"}]


# Bag-of-words similarities on the labelled set below run from 0.48 to 0.81; the unrelated
# request scores 0.03. (A real sentence-embedding model would use the default, 0.7.)
THRESHOLD = 0.4


DESCRIPTIONS = {
    "code": ("review python code for bugs and style", ("code", "python")),
    "terse": ("answer tersely in one short line", ("short",)),
    "legal": ("legal contracts clauses and liability", ("law",)),
}


LABELLED = [  # (request text, the adapter a person would pick)
    ("please review this python code for bugs", "code"),
    ("is the style of my python code ok", "code"),
    ("answer in one short line please", "terse"),
    ("one line answer tersely", "terse"),
    ("what liability do these contracts clauses give", "legal"),
    ("explain the legal clauses in contracts", "legal"),
]


def adapter(built: dict[str, Path], aid: str, *, source: str | None = None, version: str = "1", rank: int | None = None) -> AdapterConfig:
    desc, tags = DESCRIPTIONS[aid]
    return AdapterConfig(id=aid, version=version, dir=built[source or aid], rank=rank or (8 if (source or aid) == "legal" else 4),
                         description=desc, tags=tags)  # fmt: skip


def backend(built: dict[str, Path], adapters: tuple[AdapterConfig, ...], *, max_loras: int = 8, threshold: float | None = None,
            **selecting: Any) -> Any:  # fmt: skip
    """A loaded backend; ``threshold`` (and SelectionConfig's ``selecting``: max_adapters, combine) offer '<tenant>:auto'."""
    from zoo_agent.resident.worker.backend import TransformersBackend

    selection = SelectionConfig(embedding_dir=built["embedder"], embedding_label="e@1", threshold=threshold, **selecting) if threshold is not None else None
    worker = WorkerConfig(tenant="t", model="m", version="1", version_dir=built["base"], adapters=adapters, max_loras=max_loras,
                          base_names=("m",), selection=selection)  # fmt: skip
    b = TransformersBackend(built["base"], allow_pickle=False, allow_code=False, device="cpu", worker=worker)
    b.load()
    return b


def greedy(b: Any, aid: str | None, tokens: int = 12) -> str:
    from zoo_agent.resident.engine.base import Generated, Request

    return str(b.complete(Request(PROMPT, None, tokens, 0.0, 1.0, adapter=aid, ignore_eos=True), Generated()))


def peft_reference(built: dict[str, Path], aid: str, tokens: int = 12, *, also: tuple[str, ...] = (), weights: tuple[float, ...] = ()) -> str:
    """peft's own answer for one adapter, in a fresh model: what 'the right adapter ran' means; with
    ``also`` and ``weights``, peft's weighted composition of them all (an explicit set, issue #36)."""
    from transformers import AutoTokenizer

    ids = peft_ids(built, (aid, *also), tokens=tokens, **({"combine": "weighted", "weights": weights} if weights else {}))
    return str(AutoTokenizer.from_pretrained(built["base"]).decode(ids, skip_special_tokens=True))


def peft_ids(built: dict[str, Path], aids: tuple[str, ...], *, combine: str = "sum", weights: tuple[float, ...] = (),
             messages: list[dict[str, str]] = PROMPT, tokens: int = 12) -> list[int]:  # fmt: skip
    """The greedy token ids of a fresh PeftModel with ``aids`` composed by peft itself (issue #21):
    "sum" all active at once, "weighted" one add_weighted_adapter("cat") adapter; one id: that adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built["base"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(built["base"]), str(built[aids[0]]), adapter_name=aids[0])
    for aid in aids[1:]:
        model.load_adapter(str(built[aid]), adapter_name=aid)
    if combine == "weighted":
        model.add_weighted_adapter(list(aids), list(weights), "mix", combination_type="cat")
        model.set_adapter("mix")
    else:
        model.base_model.set_adapter(list(aids))
    model.eval()
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        ids = model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return [int(t) for t in ids[0][enc["input_ids"].shape[1]:]]


async def call(b: Any, requests: list[tuple[str, str, dict[str, Any] | None]]) -> list[tuple[int, Any]]:
    import httpx

    from zoo_agent.resident.worker.app import ServingState, create_app

    state = ServingState("t", "m", "1", b, {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)), base_url="http://zoo", timeout=60) as client:
        async def one(method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
            r = await client.request(method, path, json=body)
            return r.status_code, r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text

        return list(await asyncio.gather(*(one(*req) for req in requests)))


@contextmanager
def generated_ids(b: Any) -> Iterator[dict[str, list[int]]]:
    """The token ids each finished request generated, by its last message: the backend reports text only."""
    seen: dict[str, list[int]] = {}
    finish = b.finish

    def spy(request: Any, result: Any, out: Any) -> None:
        ids = out[0] if isinstance(out, tuple) else getattr(out, "sequences", out)[0].tolist()
        seen[(request.messages or [{}])[-1].get("content", request.prompt)] = [int(t) for t in ids[result.prompt_tokens :]]
        finish(request, result, out)

    b.finish = spy
    try:
        yield seen
    finally:
        del b.finish
