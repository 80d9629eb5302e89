"""A llama.cpp tenant served by the resident (issue #33): `llama-server` as the tenant's worker,
behind the router, answering as it does when asked directly; READY only after a real generation;
replaced when it dies or hangs, while another tenant streams.

Real processes throughout: the resident, the `llama-server` that .ci/llama-cpp builds, the tiny
transformers model converted to GGUF by that source's converter, the httpx client on loopback.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.llamacpp import LlamaCpp, declare_gguf, with_context_length, write_llama_index
from tests.support.resident import Resident
from tests.support.victim import make_victim, snapshot
from tests.support.world import World
from zoo_agent.resident.config import WorkerConfig
from zoo_agent.resident.engines.llamacpp import engine_env, server_argv

pytestmark = pytest.mark.resident

GENERATION = {"temperature": 0, "max_tokens": 12}
PROMPTS = ["Hello", "The quick brown fox", "Once upon a time", "1 2 3 4", "zoo", "What is a model?", "abc def", "Tell me more"]
MORE_PROMPTS = ["A host serves", "Adapters change", "pinned by its digest", "How are you?", "x", "The zoo keeps every model"]


def _tenant(**resources: Any) -> dict[str, Any]:
    return {"model": "m", "pinned": True, "generation": GENERATION, "resources": {"max_batch": 8, "max_context": 256, **resources}}


def _world(tmp: Path, gguf: Path, tenants: dict[str, dict[str, Any]]) -> World:
    world = World(tmp)
    declare_gguf(world, "m", "v1", {gguf.name: gguf.read_bytes()})
    write_llama_index(world, tenants)
    result = world.run("apply")
    assert result.exit_code == 0, result.output
    return world


@contextlib.contextmanager
def _direct(llama_cpp: LlamaCpp, gguf: Path, where: Path) -> Iterator[httpx.Client]:
    """`llama-server` started directly with the command line the resident gives tenant t."""
    config = WorkerConfig(tenant="t", model="m", version="v1", version_dir=gguf.parent, max_batch=8, max_context=256, defaults=GENERATION)
    (where / "slots").mkdir(parents=True, exist_ok=True)
    sock = str(where / "direct.sock")
    proc = subprocess.Popen(server_argv(str(llama_cpp.server), config, gguf, sock, where / "slots"), env=engine_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    # One request per connection, as the front asks it (llama-server 0.3.36's own closed an httpx
    # client's next connection without an answer now and then).
    client = httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://llama", timeout=60, headers={"Connection": "close"})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, "llama-server exited"
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:  # listening yet? (a refused httpx connect leaks its socket: a ResourceWarning, an error under -W error)
                probe.connect(sock)
                listening = True
            except OSError:
                listening = False
            finally:
                probe.close()
            if listening and client.get("/health").status_code == 200:
                break
            time.sleep(0.1)
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=30)


def _streamed(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """A streamed answer's text, and its events (an error event fails the caller's check)."""
    events = []
    with client.stream("POST", url, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    text = "".join((c.get("delta", {}).get("content") or c.get("text") or "") for e in events for c in e.get("choices", []))
    return text, events


def _text(answer: dict[str, Any]) -> str:
    choice = answer["choices"][0]
    return str(choice["message"]["content"] if "message" in choice else choice["text"])


@pytest.fixture(scope="module")
def served(llama_cpp: LlamaCpp, tiny_gguf: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Resident, httpx.Client]]:
    """One resident serving tenant t (the f32 GGUF), and the same llama-server asked directly."""
    world = _world(tmp_path_factory.mktemp("served"), tiny_gguf["f32"], {"t": _tenant()})
    with _direct(llama_cpp, tiny_gguf["f32"], world.tmp) as direct:
        # llama.cpp's own variables in the operator's environment never reach the engine: a key there would lock the router out.
        r = Resident(world, "--llama-server", str(llama_cpp.server), env={"LLAMA_API_KEY": "not-ours", "LLAMA_ARG_UI": "true"})
        try:
            r.wait_ready(120)
            yield r, direct
        finally:
            out = r.stop()
    assert "Traceback" not in out, out[-3000:]
    assert "failed before answering" not in out, out[-3000:]  # no request had to go twice


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_greedy_answers_through_the_router_equal_llama_server_asked_directly(served: tuple[Resident, httpx.Client], path: str) -> None:
    r, direct = served

    def body(prompt: str) -> dict[str, Any]:
        return {"model": "t", **({"messages": [{"role": "user", "content": prompt}]} if "chat" in path else {"prompt": prompt})}

    expected = [_text(direct.post(path, json=body(p)).json()) for p in PROMPTS]
    expected_streamed = [_streamed(direct, path, body(p))[0] for p in PROMPTS]  # it holds back a last incomplete UTF-8 character
    assert len(set(expected)) > 1  # the prompts tell the answers apart
    with httpx.Client(base_url=r.url, timeout=60) as client, concurrent.futures.ThreadPoolExecutor(16) as pool:
        whole = list(pool.map(lambda p: client.post(path, json=body(p)), PROMPTS))
        streamed = list(pool.map(lambda p: _streamed(client, path, body(p)), PROMPTS))
    assert [a.status_code for a in whole] == [200] * len(PROMPTS), [a.text for a in whole]
    assert [_text(a.json()) for a in whole] == expected
    assert [text for text, _ in streamed] == expected_streamed
    assert all(a.json()["model"] == "t" for a in whole)
    assert all(events[-1]["choices"][0]["finish_reason"] == "length" for _, events in streamed)


def test_a_prompt_past_max_context_is_a_400_naming_messages(served: tuple[Resident, httpx.Client]) -> None:
    r, _ = served
    long = "hello " * 400  # more tokens than max_context (256)
    chat = httpx.post(r.url + "/v1/chat/completions", json={"model": "t", "messages": [{"role": "user", "content": long}]}, timeout=60)
    assert chat.status_code == 400, chat.text
    error = chat.json()["error"]
    assert error["param"] == "messages" and error["type"] == "invalid_request_error", error
    assert error["message"].startswith("messages: ") and "context of 256" in error["message"], error
    streamed = httpx.post(r.url + "/v1/chat/completions", json={"model": "t", "stream": True, "messages": [{"role": "user", "content": long}]}, timeout=60)
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "messages", streamed.text
    completion = httpx.post(r.url + "/v1/completions", json={"model": "t", "prompt": long}, timeout=60)
    assert completion.status_code == 400 and completion.json()["error"]["param"] == "prompt", completion.text
    assert httpx.post(r.url + "/v1/completions", json={"model": "t", "prompt": "short"}, timeout=60).status_code == 200


def test_what_llama_server_would_misserve_is_refused_and_its_metrics_carry_the_tenant(served: tuple[Resident, httpx.Client]) -> None:
    r, _ = served
    adapter = httpx.post(r.url + "/v1/completions", json={"model": "t:sql", "prompt": "x"}, timeout=60)
    assert adapter.status_code == 404 and adapter.json()["error"]["param"] == "model", adapter.text  # never the base model's answer
    session = httpx.post(r.url + "/v1/completions", json={"model": "t", "session": "s1", "prompt": "x"}, timeout=60)  # a session is a chat
    assert session.status_code == 400 and session.json()["error"]["param"] == "session", session.text
    assert httpx.get(r.url + "/v1/sessions/s1", params={"model": "t"}, timeout=60).status_code == 404  # none yet (test_llamacpp_sessions)
    assert [m["id"] for m in httpx.get(r.url + "/v1/models", timeout=10).json()["data"]] == ["t"]
    metrics = httpx.get(r.url + "/metrics", timeout=30).text
    assert 'llamacpp:tokens_predicted_total{tenant="t"}' in metrics, metrics[-2000:]
    info = json.loads((r.root / "resident/tenants/t/model-info.json").read_text())
    assert info["backend"] == "llama.cpp" and info["dtype"] == "f32" and info["footprint"]["weights"] > 0 and info["footprint"]["kv"] > 0, info
    assert (r.root / "resident/tenants/t/slots").is_dir()


def _fails_to_start(world: World, llama_cpp: LlamaCpp) -> tuple[dict[str, str], str]:
    r = Resident(world, "--llama-server", str(llama_cpp.server))
    try:
        first = r.notify.wait(lambda m: "READY" in m or "ERRNO" in m, timeout=120)
        code = r.proc.wait(timeout=60) if "READY" not in first else None
    finally:
        out = r.stop()
    assert "READY" not in r.notify.keys(), f"READY=1 without a generation that worked: {first}"
    assert code == 1, out  # a deterministic failure: exit 1, not a restart loop
    assert first["ERRNO"] == str(errno.EIO)
    assert "restarting in" not in out and "Traceback" not in out, out
    return first, out


def test_a_gguf_that_loads_but_cannot_generate_never_sends_ready(llama_cpp: LlamaCpp, tiny_gguf: dict[str, Path], tmp_path: Path) -> None:
    gguf = with_context_length(tiny_gguf["q8_0"], tmp_path / "ctx1.gguf", 1)  # it loads; every slot holds 1 token
    first, _ = _fails_to_start(_world(tmp_path / "w", gguf, {"t": _tenant()}), llama_cpp)
    assert first["STATUS"].startswith("cannot load m@v1: the warm-up generation failed: prompt: "), first
    assert "context of 1" in first["STATUS"], first


def test_a_llama_server_that_exits_while_loading_fails_the_start_in_one_line(llama_cpp: LlamaCpp, tiny_gguf: dict[str, Path], tmp_path: Path) -> None:
    data = tiny_gguf["q8_0"].read_bytes()
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(data[: len(data) * 2 // 3])  # the header is whole; tensors end past the file
    first, _ = _fails_to_start(_world(tmp_path / "w", truncated, {"t": _tenant()}), llama_cpp)
    assert first["STATUS"].startswith("cannot load m@v1: llama-server exited with status 1 while loading: "), first
    assert "not within the file bounds" in first["STATUS"], first
    assert "\n" not in first["STATUS"]


def test_a_slots_directory_planted_as_a_link_is_refused_and_the_victim_unchanged(llama_cpp: LlamaCpp, tiny_gguf: dict[str, Path],
                                                                                tmp_path: Path) -> None:  # fmt: skip
    victim = make_victim(tmp_path / "victim")
    before = snapshot(victim)
    world = _world(tmp_path / "w", tiny_gguf["q4_k_m"], {"t": _tenant()})
    (world.root / "resident/tenants/t").mkdir(parents=True)
    (world.root / "resident/tenants/t/slots").symlink_to(victim)
    first, _ = _fails_to_start(world, llama_cpp)
    assert first["STATUS"] == f"cannot load m@v1: {world.root}/resident/tenants/t/slots: not a directory of ours", first
    assert snapshot(victim) == before


def _pid(r: Resident, tenant: str) -> int:
    return int(json.loads((r.root / f"resident/tenants/{tenant}/model-info.json").read_text())["pid"])


def _replaced(r: Resident, tenant: str, old: int, timeout: float = 60) -> int:
    """The pid of the llama-server that serves ``tenant`` once another than ``old`` answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (pid := _pid(r, tenant)) != old:
                answer = httpx.post(r.url + "/v1/completions", json={"model": tenant, "prompt": "Hello"}, timeout=60)
                assert answer.status_code == 200, answer.text
                return pid
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{tenant} was not replaced within {timeout}s: {r.tail()}")


def test_a_killed_and_a_stopped_llama_server_are_replaced_while_another_tenant_streams(llama_cpp: LlamaCpp, tiny_gguf: dict[str, Path],
                                                                                      tmp_path: Path) -> None:  # fmt: skip
    world = _world(tmp_path, tiny_gguf["q8_0"], {"a": _tenant(max_batch=2), "b": _tenant(max_batch=2)})
    r = Resident(world, "--llama-server", str(llama_cpp.server))
    stop, done, failures = threading.Event(), [], []

    def stream_b() -> None:
        with httpx.Client(base_url=r.url, timeout=60) as client:
            while not stop.is_set() and len(done) < 10_000:
                try:
                    text, events = _streamed(client, "/v1/completions", {"model": "b", "prompt": "Hello", "max_tokens": 24})
                    assert events and not any("error" in e for e in events), events
                    done.append(text)
                except Exception as exc:  # noqa: BLE001 - every failure is the test's finding
                    failures.append(repr(exc))

    try:
        r.wait_ready(120)
        first = _pid(r, "a")
        streamer = threading.Thread(target=stream_b, daemon=True)
        streamer.start()
        os.kill(first, signal.SIGKILL)
        second = _replaced(r, "a", first)
        os.kill(second, signal.SIGSTOP)  # alive, answering nothing: the pings time out
        third = _replaced(r, "a", second)
        with pytest.raises(ProcessLookupError):
            os.kill(second, 0)  # the stopped one was killed, not left behind
        stop.set()
        streamer.join(timeout=120)
        metrics = httpx.get(r.url + "/metrics", timeout=30).text
    finally:
        stop.set()
        out = r.stop()
    assert failures == [] and len(done) > 5, (failures[:3], len(done))
    assert len(set(done)) == 1  # greedy: every stream of b said the same
    assert 'zoo:worker_restarts_total{reason="crash",tenant="a"} 1.0' in metrics, metrics
    assert 'zoo:worker_restarts_total{reason="hang",tenant="a"} 1.0' in metrics, metrics
    assert 'zoo:worker_restarts_total{reason="crash",tenant="b"} 0.0' in metrics, metrics
    assert third not in (first, second) and "Traceback" not in out
    for pid in (first, second, third):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # none outlives the resident


@pytest.mark.parametrize("binary", ["missing", "old"])
def test_a_missing_or_old_llama_server_stops_the_start_in_one_line(tmp_path: Path, binary: str) -> None:
    world = World(tmp_path)
    declare_gguf(world, "m", "v1", {"m.gguf": b"GGUF" + bytes(20)})  # never loaded: the binary is checked first
    write_llama_index(world, {"t": _tenant()})
    old = tmp_path / "llama-server"
    old.write_text('#!/bin/sh\necho "version: 3000 (abc)"\n')
    old.chmod(0o755)
    path = str(tmp_path / "nowhere" / "llama-server") if binary == "missing" else str(old)
    r = Resident(world, "--llama-server", path)
    try:
        code = r.proc.wait(timeout=60)
    finally:
        out = r.stop()
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2, out  # a usage error: the flag names what is wrong
    assert len(lines) == 1 and "Traceback" not in out, out
    assert lines[0].startswith(f"--llama-server {path}: " if binary == "old" else f"--llama-server: {path} is not an executable file"), out
    assert ("lacks --host PATH.sock (unix sockets)" in out) if binary == "old" else ("install llama.cpp, or pass --llama-server PATH" in out), out


def _paged(world: World) -> list[tuple[str, str]]:
    lines = (world.root / "host/actions.jsonl").read_text().splitlines()
    return [(r["action"], r["id"]) for r in map(json.loads, lines) if r["action"] in ("page-in", "page-out")]


def test_five_llama_cpp_tenants_page_least_recently_used_never_the_pinned_nor_the_busy(llama_cpp: LlamaCpp, tiny_gguf: dict[str, Path],
                                                                                         tmp_path: Path) -> None:  # fmt: skip
    """Five tenants, room for the pinned one and two others, as the transformers tenants page
    (tests/integration/test_paging.py); b streams (busy) while c, d and e page around it."""
    from zoo_agent.index.fit import read_config, tenant_footprint
    from zoo_agent.index.load import load_index

    tenants = {t: {**_tenant(max_batch=2, max_context=4096), "pinned": t == "a"} for t in "abcde"}
    world = _world(tmp_path, tiny_gguf["q4_k_m"], tenants)
    idx = load_index(world.index, str(world.index))
    fp = tenant_footprint(idx, "a", read_config(world.root / "models/m/current")).total
    write_llama_index(world, tenants, budget=str(int(fp * 3.5)))
    r = Resident(world, "--llama-server", str(llama_cpp.server))
    answers: dict[str, set[str]] = {}
    pids: dict[str, list[int]] = {}

    def ask(tenant: str) -> None:
        answer = httpx.post(r.url + "/v1/completions", json={"model": tenant, "prompt": "Hello"}, timeout=120)
        assert answer.status_code == 200, answer.text
        answers.setdefault(tenant, set()).add(_text(answer.json()))
        pids.setdefault(tenant, []).append(_pid(r, tenant))

    try:
        r.wait_ready(120)
        ask("b")
        body = {"model": "b", "prompt": "Hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=r.url, timeout=120) as client, client.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # b is busy, and the least recently used: the rest waits for us to read it
            ask("c")
            ask("d")  # c goes, not b
            ask("e")  # d goes, not b
            assert httpx.get(r.url + "/health", timeout=10).json()["tenants"]["b"]["inflight"] == 1  # still streaming
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert not any("error" in e for e in events) and events[-1]["choices"][0]["finish_reason"] == "length", events[-1:]
        for tenant in ["c", "a", "d", "c"]:  # e goes (b was in use until its stream ended), then b, then none (c is loaded)
            ask(tenant)
        health = httpx.get(r.url + "/health", timeout=10).json()
    finally:
        out = r.stop()
    assert [t for action, t in _paged(world) if action == "page-out"] == ["c", "d", "e", "b"], out[-3000:]
    assert {t for t, h in health["tenants"].items() if h["state"] == "serving"} == {"a", "c", "d"}
    assert len(set(pids["a"])) == 1 and len(set(pids["c"])) == 2  # the pinned one served throughout; c was paged out and in
    assert all(len(texts) == 1 for texts in answers.values()), answers  # a tenant paged out and in again answers as before
    for pid in {pids["b"][0], pids["c"][0], pids["d"][0], pids["e"][0]}:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # each paged-out one drained and stopped
    assert "Traceback" not in out and "failed before answering" not in out, out[-3000:]


def test_a_reload_drains_the_old_llama_server_without_failing_its_stream(llama_cpp: LlamaCpp, tiny_gguf: dict[str, Path], tmp_path: Path) -> None:
    world = _world(tmp_path, tiny_gguf["f32"], {"t": _tenant(max_batch=2, max_context=4096)})
    r = Resident(world, "--llama-server", str(llama_cpp.server))
    try:
        r.wait_ready(120)
        old = _pid(r, "t")
        body = {"model": "t", "prompt": "Hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=r.url, timeout=120) as client, client.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # under way; the rest (megabytes) waits for us to read it
            declare_gguf(world, "m", "v2", {tiny_gguf["q8_0"].name: tiny_gguf["q8_0"].read_bytes()})
            write_llama_index(world, {"t": _tenant(max_batch=2, max_context=4096)})
            assert world.run("apply").exit_code == 0
            reloaded = world.run("resident", "reload", "--pid", str(r.proc.pid), "--timeout", "120")
            assert reloaded.exit_code == 0 and "reloaded: t" in reloaded.output, reloaded.output
            new = _pid(r, "t")
            os.kill(old, 0)  # still streaming to us
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert not any("error" in e for e in events), [e for e in events if "error" in e]
        assert events[-1]["choices"][0]["finish_reason"] == "length" and len(events) > 1000
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.kill(old, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the drained llama-server did not stop")
        assert new != old and json.loads((r.root / "resident/tenants/t/model-info.json").read_text())["version"] == "v2"
    finally:
        out = r.stop()
    assert "Traceback" not in out, out[-3000:]


def _agrees(llama: str, ours: str) -> bool:
    """Whether llama.cpp's text is the transformers tenant's on the same tokens. Random weights answer bytes
    that are not UTF-8: each decoder puts one U+FFFD per invalid sequence, cut differently (so a run of them
    counts as one), and llama-server keeps back the last bytes (up to 3) where they look like the start of a
    character, in its streams and its chat answers (ours shows them as U+FFFD)."""
    whole, part = re.sub("\ufffd+", "\ufffd", ours), re.sub("\ufffd+", "\ufffd", llama)
    return whole.startswith(part) and len(whole) - len(part) <= 3


def _decided(model_dir: Path, prompts: list[str], steps: int, chat: bool) -> list[str]:
    """The prompts whose every greedy step, as transformers computes it, has its top two logits more than
    1e-3 apart: random weights give near-ties (1e-5 apart) that two engines' f32 kernels may break either way."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    decided = []
    for prompt in prompts:
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]  # fmt: skip
        else:
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        margins = []
        with torch.no_grad():
            for _ in range(steps):
                top = torch.topk(model(ids).logits[0, -1], 2)
                margins.append(float(top.values[0] - top.values[1]))
                ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
        if min(margins) > 1e-3:
            decided.append(prompt)
    return decided


def test_the_f32_gguf_answers_as_the_transformers_tenant_on_the_same_weights_through_one_resident(
        llama_cpp: LlamaCpp, tiny_gguf: dict[str, Path], tmp_path: Path) -> None:  # fmt: skip
    """One resident, two tenants of the same tiny model: the transformers one on its safetensors and
    the llama.cpp one on their f32 GGUF conversion. Greedy, each answer the same text and the same
    number of tokens, asked together, streamed and not."""
    world = World(tmp_path)
    world.artifact("hf", "v1", {p.name: p.read_bytes() for p in sorted(tiny_gguf["hf"].iterdir())})
    declare_gguf(world, "m", "v1", {tiny_gguf["f32"].name: tiny_gguf["f32"].read_bytes()})
    write_llama_index(world, {"gg": _tenant(), "tf": {**_tenant(), "model": "hf", "backend": "transformers"}})
    applied = world.run("apply")
    assert applied.exit_code == 0, applied.output
    r = Resident(world, "--llama-server", str(llama_cpp.server))
    try:
        r.wait_ready(180)
        with httpx.Client(base_url=r.url, timeout=120) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
            for path in ("/v1/completions", "/v1/chat/completions"):
                prompts = _decided(tiny_gguf["hf"], PROMPTS + MORE_PROMPTS, 12, chat="chat" in path)
                assert len(prompts) >= 6, prompts

                def body(tenant: str, prompt: str, path: str = path) -> dict[str, Any]:
                    asked = {"messages": [{"role": "user", "content": prompt}]} if "chat" in path else {"prompt": prompt}
                    return {"model": tenant, "ignore_eos": True, **asked}

                def ask(tenant: str, prompt: str, path: str = path) -> tuple[str, int]:
                    answer = client.post(path, json=body(tenant, prompt))
                    assert answer.status_code == 200, answer.text
                    return _text(answer.json()), int(answer.json()["usage"]["completion_tokens"])

                def streamed(tenant: str, prompt: str, path: str = path) -> str:
                    return _streamed(client, path, body(tenant, prompt))[0]

                tf = list(pool.map(lambda p: ask("tf", p), prompts))
                gg = list(pool.map(lambda p: ask("gg", p), prompts))
                assert len({text for text, _ in tf}) > 1 and all(n == 12 for _, n in tf), tf  # the prompts tell the answers apart
                assert [n for _, n in gg] == [n for _, n in tf], path
                assert all(_agrees(g, t) for (g, _), (t, _) in zip(gg, tf, strict=True)), (path, gg, tf)
                assert list(pool.map(lambda p: streamed("tf", p), prompts)) == [text for text, _ in tf], path
                assert all(_agrees(g, t) for g, (t, _) in zip(pool.map(lambda p: streamed("gg", p), prompts), tf, strict=True)), path
    finally:
        out = r.stop()
    assert "Traceback" not in out, out[-3000:]
