"""A llama.cpp tenant's GGUF adapters through the router (issue #33): declared, pinned, loaded at
its start and chosen per request, answering exactly as `llama-server` started directly with that
adapter applied; its base model answering as if it had none.

Real processes throughout: the resident, the `llama-server` that .ci/llama-cpp builds, the tiny
transformers model and the tests' peft adapters, converted by that source's converters.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.llamacpp import LlamaCpp, declare_gguf, declare_gguf_lora, serve, write_llama_index
from tests.support.resident import Resident
from tests.support.world import World
from zoo_agent.resident.config import WorkerConfig
from zoo_agent.resident.engines.llamacpp import engine_env, server_argv

pytestmark = pytest.mark.resident

GENERATION = {"temperature": 0, "max_tokens": 12}
PROMPTS = ["Hello there", "The quick brown fox", "Once upon a time", "1 2 3 4"]


@contextlib.contextmanager
def _direct(llama_cpp: LlamaCpp, gguf: Path, where: Path, *lora: str) -> Iterator[httpx.Client]:
    """`llama-server` started directly with the command line the resident gives tenant t, and ``lora``
    (``--lora FILE``: applied at scale 1 to every request, which sends no ``lora`` field)."""
    config = WorkerConfig(tenant="t", model="m", version="v1", version_dir=gguf.parent, max_batch=4, max_context=256, defaults=GENERATION)
    where.mkdir(parents=True, exist_ok=True)
    sock = str(where / "direct.sock")
    argv = server_argv(str(llama_cpp.server), config, gguf, sock, where) + list(lora)
    proc = subprocess.Popen(argv, env=engine_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://llama", timeout=60, headers={"Connection": "close"})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"llama-server exited: {argv}"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                listening = probe.connect_ex(sock) == 0
            if listening and client.get("/health").status_code == 200:
                break
            time.sleep(0.1)
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=30)


def _body(model: str, prompt: str, chat: bool, **extra: Any) -> dict[str, Any]:
    return {"model": model, **({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}), **extra}


def _text(answer: httpx.Response) -> str:
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    return str(choice["message"]["content"] if "message" in choice else choice["text"])


def _streamed(client: httpx.Client, url: str, body: dict[str, Any]) -> str:
    text = []
    with client.stream("POST", url, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += [c.get("delta", {}).get("content") or c.get("text") or "" for c in json.loads(line[6:]).get("choices", [])]
    return "".join(text)


@pytest.fixture(scope="module")
def answers(llama_cpp: LlamaCpp, tiny_gguf: dict[str, Path], tiny_gguf_loras: dict[str, Path],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[tuple[str, bool], str]]:  # fmt: skip
    """What `llama-server` answers started directly: without adapters, with each, with both, with terse at -0.5."""
    where = tmp_path_factory.mktemp("direct")
    code, terse = (str(tiny_gguf_loras[a]) for a in ("code", "terse"))
    started = {"base": (), "code": ("--lora", code), "terse": ("--lora", terse), "code+terse": ("--lora", terse, "--lora", code),  # in the order t declares them
               "terse*-0.5": ("--lora-scaled", f"{terse}:-0.5")}  # fmt: skip
    out: dict[str, dict[tuple[str, bool], str]] = {}
    for name, lora in started.items():
        with _direct(llama_cpp, tiny_gguf["f32"], where / name.replace("*", "_"), *lora) as direct:
            out[name] = {(p, chat): _text(direct.post("/v1/chat/completions" if chat else "/v1/completions", json=_body("t", p, chat)))
                         for p in PROMPTS for chat in (False, True)}  # fmt: skip
    return out


@pytest.fixture(scope="module")
def served(llama_cpp: LlamaCpp, tiny_gguf: dict[str, Path], tiny_gguf_loras: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Resident]:  # fmt: skip
    """A resident serving tenant t (the f32 GGUF with adapters code and terse, and bad: a model, not an
    adapter) from a zoo whose path holds a comma and a quote (llama.cpp splits --lora at commas), and
    tenant plain (no adapters)."""
    world = World(tmp_path_factory.mktemp("served") / 'zoo,"a')
    world.tmp.mkdir()
    declare_gguf(world, "m", "v1", {"tiny-f32.gguf": tiny_gguf["f32"].read_bytes()})
    for aid in ("terse", "code"):  # declared in this order: terse is llama-server's adapter 0, code its 1
        declare_gguf_lora(world, aid, "1", {f"{aid}.gguf": tiny_gguf_loras[aid].read_bytes()})
    declare_gguf_lora(world, "bad", "1", {"bad.gguf": tiny_gguf["q8_0"].read_bytes()})  # pinned, verified, and no adapter
    resources = {"max_batch": 4, "max_context": 256}
    write_llama_index(world, {"t": {"model": "m", "loras": ["terse", "bad", "code"], "pinned": True, "generation": GENERATION, "resources": resources},
                              "plain": {"model": "m", "pinned": True, "generation": GENERATION, "resources": resources}})  # fmt: skip
    result = world.run("apply")
    assert result.exit_code == 0, result.output
    r = Resident(world, "--llama-server", str(llama_cpp.server))
    try:
        r.wait_ready(120)
        yield r
    finally:
        out = r.stop()
    assert "Traceback" not in out, out[-3000:]
    assert "adapter refused: bad@1: bad.gguf: not a LoRA adapter (general.type 'model')" in out, out[-3000:]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_an_adapter_answers_through_the_router_as_llama_server_started_with_it(served: Resident, answers: dict[str, dict[tuple[str, bool], str]],
                                                                              chat: bool) -> None:  # fmt: skip
    url = "/v1/chat/completions" if chat else "/v1/completions"
    asked = [("t", "base"), ("plain", "base"), ("t:code", "code"), ("t:terse", "terse"), ("t:code+terse", "code+terse"),
             ("t:terse+code", "code+terse")]  # fmt: skip
    for name in ("code", "terse"):  # each adapter changes the answer, and not as the other does
        assert [answers[name][p, chat] for p in PROMPTS] != [answers["base"][p, chat] for p in PROMPTS]
    assert [answers["code"][p, chat] for p in PROMPTS] != [answers["terse"][p, chat] for p in PROMPTS]
    jobs = [(m, p) for m, _ in asked for p in PROMPTS]
    with httpx.Client(base_url=served.url, timeout=60) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        # One at a time, as the direct answers were asked: the same batch, so the same numbers to the last bit.
        got = [(job, _text(client.post(url, json=_body(job[0], job[1], chat)))) for job in jobs]
        # All at once, mixed: the base model's requests and each adapter's share the engine's slots and all
        # are answered. Not compared to the letter: the random tiny model has near-ties (top logits 1e-5
        # apart) that a batch of another size rounds the other way, in llama-server alone as well.
        together = list(pool.map(lambda job: client.post(url, json=_body(job[0], job[1], chat)), jobs))
        scaled = _body("t", PROMPTS[0], chat, x_zoo={"adapters": [{"name": "terse", "scale": -0.5}]})
        negative = _text(client.post(url, json=scaled))
        streamed = _streamed(client, url, _body("t:code", PROMPTS[1], chat))
    expected = {(m, p): answers[ref][p, chat] for m, ref in asked for p in PROMPTS}
    assert dict(got) == expected
    assert [(r.status_code, bool(_text(r))) for r in together] == [(200, True)] * len(jobs)
    assert negative == answers["terse*-0.5"][PROMPTS[0], chat]
    assert streamed == answers["code"][PROMPTS[1], chat]


def test_the_adapters_are_listed_and_what_cannot_be_served_is_refused(served: Resident) -> None:
    with httpx.Client(base_url=served.url, timeout=60) as client:
        ids = [card["id"] for card in client.get("/v1/models").json()["data"]]
        assert {"t", "t:terse", "t:code", "plain"} <= set(ids) and not [i for i in ids if i.startswith("plain:")], ids
        assert "t:bad" not in ids  # refused before llama-server would fail to load it: the tenant serves without it
        bad = client.post("/v1/completions", json={"model": "t:bad", "prompt": "x"}).json()["error"]
        assert (bad["code"], bad["message"]) == ("adapter_refused", "model: adapter refused: bad@1: bad.gguf: not a LoRA adapter "
                                                 "(general.type 'model'); convert_lora_to_gguf.py makes one"), bad  # fmt: skip
        cases = [
            ({"model": "t:auto", "prompt": "x"}, 400, "model"),  # choosing needs the embedding model: not beside llama-server yet
            ({"model": "t", "prompt": "x", "lora": [{"id": 0, "scale": 1}]}, 400, "lora"),  # by position, past our names
            ({"model": "plain", "prompt": "x", "lora": [{"id": 0, "scale": 1}]}, 400, "lora"),
            ({"model": "t:sql", "prompt": "x"}, 404, "model"),
            ({"model": "plain:code", "prompt": "x"}, 404, "model"),  # another tenant's adapter: never the base model's answer instead
            ({"model": "t:code", "prompt": "x", "x_zoo": {"exclude": ["code"]}}, 400, "model"),
        ]
        for body, status, param in cases:
            answer = client.post("/v1/completions", json=body)
            assert (answer.status_code, answer.json()["error"]["param"]) == (status, param), (body, answer.text)


def test_a_new_version_of_an_adapter_starts_a_new_llama_server_with_it(llama_cpp: LlamaCpp, tiny_gguf: dict[str, Path], tiny_gguf_loras: dict[str, Path],
                                                                     answers: dict[str, dict[tuple[str, bool], str]], tmp_path: Path) -> None:  # fmt: skip
    """Its adapters are files on its command line: a published version is a new llama-server (a reload), never a stale answer."""
    world = World(tmp_path)
    declare_gguf(world, "m", "v1", {"tiny-f32.gguf": tiny_gguf["f32"].read_bytes()})
    declare_gguf_lora(world, "terse", "1", {"terse.gguf": tiny_gguf_loras["terse"].read_bytes()})
    tenant = {"model": "m", "loras": ["terse"], "pinned": True, "generation": GENERATION, "resources": {"max_batch": 4, "max_context": 256}}
    write_llama_index(world, {"t": tenant})
    assert world.run("apply").exit_code == 0
    r = Resident(world, "--llama-server", str(llama_cpp.server))
    try:
        r.wait_ready(120)
        with httpx.Client(base_url=r.url, timeout=60) as client:

            def ask(model: str) -> str:
                return _text(client.post("/v1/completions", json=_body(model, PROMPTS[0], False)))

            assert ask("t:terse") == answers["terse"][PROMPTS[0], False]
            declare_gguf_lora(world, "terse", "2", {"terse.gguf": tiny_gguf_loras["code"].read_bytes()})  # the code adapter's bytes
            write_llama_index(world, {"t": tenant})
            assert world.run("apply").exit_code == 0
            deadline = time.monotonic() + 60
            while ask("t:terse") != answers["code"][PROMPTS[0], False]:
                assert time.monotonic() < deadline, r.tail()
                time.sleep(0.5)
            assert ask("t") == answers["base"][PROMPTS[0], False]
    finally:
        out = r.stop()
    assert "Traceback" not in out, out[-3000:]


PROMPT_IDS = [5, 17, 42, 99, 7, 250, 3]  # token ids: both engines see exactly the same input


@pytest.mark.parametrize("aid", ["code", "terse"])
def test_the_converted_adapter_answers_on_llama_server_as_peft_does_on_the_same_weights(llama_cpp: LlamaCpp, tiny_gguf: dict[str, Path],
                                                                                       tiny_gguf_loras: dict[str, Path], aid: str) -> None:  # fmt: skip
    """f32, greedy, token for token: the conversion keeps the adapter's delta and its scale (alpha / r)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_gguf["hf"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tiny_gguf_loras[aid].with_suffix(""))  # the peft directory it was converted from
    ids, expected = torch.tensor([PROMPT_IDS]), []
    with torch.no_grad():
        for _ in range(8):
            expected.append(int(model(ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[expected[-1]]])], dim=1)
    with contextlib.contextmanager(serve)(llama_cpp, tiny_gguf["f32"], "--lora", str(tiny_gguf_loras[aid])) as server:
        answer = server.post("/completion", {"prompt": PROMPT_IDS, "n_predict": 8, "temperature": 0, "top_k": 1, "ignore_eos": True,
                                             "cache_prompt": False, "return_tokens": True, "samplers": ["top_k"]})  # fmt: skip
        base_answer = server.post("/completion", {"prompt": PROMPT_IDS, "n_predict": 8, "temperature": 0, "top_k": 1, "ignore_eos": True,
                                                  "cache_prompt": False, "return_tokens": True, "samplers": ["top_k"],
                                                  "lora": [{"id": 0, "scale": 0}]})  # fmt: skip
    assert answer["tokens"] == expected
    assert base_answer["tokens"] != expected  # the adapter is what made the difference
