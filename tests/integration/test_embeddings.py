"""An embedding tenant served at ``POST /v1/embeddings`` (issue #36), through the real router and worker:
its vectors are the model's own (sentence-transformers where installed, else transformers and the
declared pooling written out here), single and batched inputs give the same vectors, hostile inputs
are one-line 400s that load nothing, it pages in and out under a budget as a generating tenant does,
and ``/v1/models``, ``/metrics``, ``/health`` and ``Status:`` show it.

Real processes: `zoo-agent resident` with the tiny chat model and two tiny sentence-transformers
embedders (mean and normalised; CLS, not normalised), published with apply; httpx on loopback.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.paging import GEN, ask
from tests.support.resident import Resident
from tests.support.world import World

pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")

pytestmark = pytest.mark.resident

WORDS = "the cat sat on a mat while a dog ran far away from the old red barn near green hills under blue sky"
TEXTS = ["the cat sat on a mat", "dog ran", "far away the old red barn near green hills", "sky", "a dog and a cat",
         "blue sky over green hills while the red dog sat", "barn"]  # fmt: skip
MAX_TOKENS = 16  # sentence_bert_config.json's max_seq_length
EMBEDDERS = {"mean": {"pooling": ("mean",), "normalize": True}, "cls": {"pooling": ("cls",), "normalize": False}}


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def embedders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two sentence-transformers layouts over one tiny 2-layer BERT: attention mixes the tokens, so padding would show."""
    from zoo_agent.demo.tiny import build_tiny_embedder, sentence_transformers_layout

    out = tmp_path_factory.mktemp("embedders")
    built = {}
    for name, how in EMBEDDERS.items():
        built[name] = sentence_transformers_layout(build_tiny_embedder(out / name, WORDS, hidden=64, layers=2, seed=7),
                                                   pooling=how["pooling"], normalize=how["normalize"], max_seq_length=MAX_TOKENS)  # fmt: skip
    return built


def _world(path: Path, tiny: dict[str, bytes], embedders: dict[str, Path], budget: str | None = None) -> World:
    world = World(path)
    world.artifact("m", "v1", tiny)
    for name, directory in embedders.items():
        world.artifact(f"e-{name}", "1", _files(directory))
    tenants: dict[str, Any] = {"chat": {"model": "m", **GEN}}
    tenants |= {f"emb-{name}": {"model": f"e-{name}", "kind": "embedding", "resources": {"max_batch": 3, "max_queue": 8}} for name in embedders}
    host: dict[str, Any] = {"tenants": list(tenants), **({"memory_budget": budget} if budget else {})}
    world.index.write_text(json.dumps({"models": world.models, "tenants": tenants, "hosts": {"h": host}}, indent=2))
    result = world.run("apply")
    assert result.exit_code == 0, result.output
    return world


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, bytes], embedders: dict[str, Path]) -> Iterator[Resident]:
    world = _world(tmp_path_factory.mktemp("served"), tiny, embedders)
    r = Resident(world)
    try:
        r.wait_ready()
        yield r
    finally:
        out = r.stop()
    assert "Traceback" not in out


def _embed(r: Resident, body: Any, **kw: Any) -> Any:
    import httpx

    return httpx.post(r.url + "/v1/embeddings", json=body, timeout=120, **kw)


def _vectors(answer: dict[str, Any]) -> list[list[float]]:
    assert [d["index"] for d in answer["data"]] == list(range(len(answer["data"])))
    return [d["embedding"] for d in answer["data"]]


def _reference(directory: Path, texts: list[str]) -> tuple[list[list[float]], int]:
    """The model's own vectors and the texts' token count: sentence-transformers' encode where installed,
    else each text alone (no padding) through transformers, pooled as its files declare, by hand."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        pass
    else:
        return SentenceTransformer(str(directory), device="cpu").encode(texts).tolist(), tokens
    modules = [m["type"].rsplit(".", 1)[1] for m in json.loads((directory / "modules.json").read_text())]
    pooling = json.loads((directory / "1_Pooling/config.json").read_text())
    model = AutoModel.from_pretrained(directory).eval()
    out = []
    for text in texts:
        with torch.inference_mode():
            hidden = model(**tokenizer([text], return_tensors="pt")).last_hidden_state[0]
        vector = hidden[0] if pooling["pooling_mode_cls_token"] else hidden.mean(0)
        out.append((vector / vector.norm() if "Normalize" in modules else vector).tolist())
    return out, tokens


@pytest.mark.parametrize("name", list(EMBEDDERS))
def test_the_answer_is_the_models_own_output_as_openai_writes_it(served: Resident, embedders: dict[str, Path], name: str) -> None:
    import numpy as np

    resp = _embed(served, {"model": f"emb-{name}", "input": TEXTS})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["object"] == "list" and answer["model"] == f"emb-{name}" and all(d["object"] == "embedding" for d in answer["data"])
    expected, tokens = _reference(embedders[name], TEXTS)
    np.testing.assert_allclose(_vectors(answer), expected, rtol=0, atol=2e-6)
    assert answer["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    norms = np.linalg.norm(np.array(_vectors(answer)), axis=1)
    assert np.allclose(norms, 1.0) == EMBEDDERS[name]["normalize"]  # normalised exactly where the model declares Normalize
    packed = _embed(served, {"model": f"emb-{name}", "input": TEXTS, "encoding_format": "base64"}).json()
    decoded = [list(struct.unpack(f"<{len(v)}f", base64.b64decode(d["embedding"]))) for v, d in zip(_vectors(answer), packed["data"], strict=True)]
    assert decoded == _vectors(answer)  # the same float32 values, bit for bit


def test_single_and_batched_inputs_give_the_same_vectors(served: Resident) -> None:
    """Alone, all seven in one request (three forward passes of up to max_batch 3, longest first), and seven
    requests at once (batched across requests): the same vectors."""
    import numpy as np

    together = _vectors(_embed(served, {"model": "emb-mean", "input": TEXTS}).json())
    alone = [_vectors(_embed(served, {"model": "emb-mean", "input": text}).json())[0] for text in TEXTS]
    concurrent: dict[int, list[float]] = {}

    def one(i: int) -> None:
        concurrent[i] = _vectors(_embed(served, {"model": "emb-mean", "input": [TEXTS[i]]}).json())[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(TEXTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-6)
    np.testing.assert_allclose([concurrent[i] for i in range(len(TEXTS))], alone, rtol=0, atol=1e-6)
    import httpx

    metrics = httpx.get(served.url + "/metrics", timeout=30).text
    batched = [line for line in metrics.splitlines() if line.startswith("zoo:embedding_batch_inputs_bucket") and 'tenant="emb-mean"' in line]
    assert any('le="2.0"' in line and float(line.rsplit(" ", 1)[1]) < float(batched[-1].rsplit(" ", 1)[1]) for line in batched), batched


HOSTILE = [
    ({"model": "emb-mean", "input": ["x"] * 2049}, 413, "input: 2049 texts; at most 2048 in one request"),
    ({"model": "emb-mean", "input": ["the cat", ""]}, 400, "input[1]: an empty string"),
    ({"model": "emb-mean", "input": ""}, 400, "input: an empty string"),
    ({"model": "emb-mean", "input": []}, 400, "input: an empty list"),
    ({"model": "emb-mean", "input": ["cat", 5]}, 400, "input[1]: must be a string, not a number"),
    ({"model": "emb-mean", "input": {"text": "cat"}}, 400, "input: a string or a list of strings, not an object"),
    ({"model": "emb-mean", "input": [[1, 2, 3]]}, 400, "input: token ids are not accepted here"),
    ({"model": "emb-mean", "input": [101, 2023]}, 400, "input: token ids are not accepted here"),
    ({"model": "emb-mean"}, 400, "input: required"),
    ({"model": "emb-mean", "input": " ".join(["cat"] * (MAX_TOKENS + 1))}, 400, f"input: {MAX_TOKENS + 1} tokens; this model embeds at most {MAX_TOKENS}"),
    ({"model": "emb-mean", "input": ["cat", " ".join(["dog"] * 40)]}, 400, "input[1]: 40 tokens; this model embeds at most 16"),
    ({"model": "emb-mean", "input": "cat", "encoding_format": "int8"}, 400, "encoding_format: 'int8' is not 'float' or 'base64'"),
    ({"model": "emb-mean", "input": "cat", "dimensions": 8}, 400, "dimensions: this model gives 64-dimensional vectors"),
    ({"model": "emb-mean", "input": "cat", "dimensions": True}, 400, "dimensions: a positive integer"),
    ({"model": "emb-mean:code", "input": "cat"}, 400, "model: 'emb-mean:code': an embedding tenant has no adapters"),
    ({"model": "chat", "input": "cat"}, 400, "model: 'chat' generates; /v1/embeddings takes an embedding tenant (here: emb-mean, emb-cls)"),
    ({"model": "nope", "input": "cat"}, 404, "model: 'nope' is not served by this host"),
    ({"input": "cat"}, 400, "model: required, a string"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "message"), HOSTILE, ids=[h[2][:40] for h in HOSTILE])
def test_hostile_inputs_are_refused_in_one_line_naming_the_field(served: Resident, body: dict[str, Any], status: int, message: str) -> None:
    resp = _embed(served, body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert message in error["message"] and "\n" not in error["message"], error
    assert error["param"] == message.split(":", 1)[0].split("[", 1)[0], error


def test_deep_json_a_lone_surrogate_and_a_chat_to_an_embedding_tenant_are_400s(served: Resident) -> None:
    import httpx

    raw = {"content-type": "application/json"}
    deep = httpx.post(served.url + "/v1/embeddings", content=b'{"model": "emb-mean", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                      headers=raw, timeout=30)  # fmt: skip
    assert deep.status_code == 400 and deep.json()["error"]["param"] == "body", deep.text
    lone = httpx.post(served.url + "/v1/embeddings", content=b'{"model": "emb-mean", "input": ["cat", "a\\ud800b"]}', headers=raw, timeout=30)
    assert lone.status_code == 400 and "input[1]: not Unicode text (a lone surrogate at character 1)" in lone.json()["error"]["message"]
    chat = httpx.post(served.url + "/v1/chat/completions", json={"model": "emb-mean", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert chat.status_code == 400 and chat.json()["error"] == {
        "message": "model: 'emb-mean' is an embedding tenant; ask POST /v1/embeddings", "type": "invalid_request_error", "param": "model",
        "code": "wrong_task"}  # fmt: skip
    completion = httpx.post(served.url + "/v1/completions", json={"model": "emb-cls", "prompt": "hi"}, timeout=30)
    assert completion.status_code == 400 and completion.json()["error"]["param"] == "model"
    unprivileged = _embed(served, {"model": "emb-mean", "input": "cat"}, headers={"X-Zoo-Priority": "system"})
    assert unprivileged.status_code == 403 and unprivileged.json()["error"]["code"] == "priority_not_allowed"
    assert _embed(served, {"model": "emb-mean", "input": "cat", "priority": 1}).status_code == 200  # vLLM's field: batch, allowed
    assert httpx.get(served.url + "/health", timeout=2).status_code == 200


def test_models_metrics_health_and_status_show_the_embedding_tenant(served: Resident) -> None:
    import httpx

    assert _embed(served, {"model": "emb-cls", "input": ["cat", "dog"]}).status_code == 200
    cards = {c["id"]: c for c in httpx.get(served.url + "/v1/models", timeout=10).json()["data"]}
    assert cards["emb-mean"]["x_zoo"]["task"] == "embed" and cards["emb-mean"]["x_zoo"]["adapters"] == []
    assert cards["chat"]["x_zoo"]["task"] == "generate"
    metrics = httpx.get(served.url + "/metrics", timeout=30).text
    assert 'zoo:router_requests_total{code="200",tenant="emb-cls"}' in metrics
    assert 'zoo:request_success_total{finished_reason="stop",tenant="emb-cls"}' in metrics
    tokens = next(line for line in metrics.splitlines() if line.startswith("zoo:prompt_tokens_total") and 'tenant="emb-cls"' in line)
    assert float(tokens.rsplit(" ", 1)[1]) >= 2
    if promtool := shutil.which("promtool"):  # the text parses as Prometheus' own, every worker's families merged
        checked = subprocess.run([promtool, "check", "metrics"], input=metrics, capture_output=True, text=True, timeout=60)
        assert "error" not in (checked.stdout + checked.stderr).lower(), checked.stdout + checked.stderr
    health = httpx.get(served.url + "/health", timeout=5).json()
    assert health["tenants"]["emb-cls"]["state"] == "serving" and health["tenants"]["emb-cls"]["model"] == "e-cls"
    status = served.wait(lambda m: "emb-cls e-cls@1 (" in m.get("STATUS", "") and "; 0 requests" not in m["STATUS"], timeout=30)["STATUS"]
    assert "tok/s" not in status.split("emb-cls", 1)[1].split(")", 1)[0]  # an embedding tenant generates no tokens


def test_an_embedding_tenant_pages_in_and_out_under_a_budget_like_a_generating_one(tmp_path: Path, tiny: dict[str, bytes],
                                                                                   embedders: dict[str, Path]) -> None:  # fmt: skip
    """A budget that holds one tenant at a time: chat, then emb-mean, then chat again, then emb-mean; each
    is paged out for the next, answers the same after it came back, and a refused request loads nothing."""
    import numpy as np

    from zoo_agent.index.fit import read_config, tenant_footprint
    from zoo_agent.index.load import load_index

    world = _world(tmp_path, tiny, {"mean": embedders["mean"]})
    idx = load_index(world.index, str(world.index))
    sizes = [tenant_footprint(idx, t, read_config(world.source_dir(idx.tenants[t].model, idx.models[idx.tenants[t].model].version))).total
             for t in ("chat", "emb-mean")]  # fmt: skip
    world = _world(tmp_path, tiny, {"mean": embedders["mean"]}, budget=str(max(sizes) + min(sizes) // 2))
    r = Resident(world)
    try:
        r.wait_ready()
        first = _vectors(_embed(r, {"model": "emb-mean", "input": TEXTS}).json())
        code, _ = ask(r, "chat")
        assert code == 200
        assert _embed(r, {"model": "emb-mean", "input": ""}).status_code == 400  # refused at the router: emb-mean stays paged out
        again = _embed(r, {"model": "emb-mean", "input": TEXTS})
        assert again.status_code == 200, again.text
        np.testing.assert_allclose(_vectors(again.json()), first, rtol=0, atol=1e-6)
        assert ask(r, "chat")[0] == 200
        lines = (world.root / "host/actions.jsonl").read_text().splitlines()
        paged = [(e["action"], e["id"]) for e in map(json.loads, lines) if e["action"] in ("page-in", "page-out")]
        assert [t for action, t in paged if action == "page-out"] == ["chat", "emb-mean", "chat", "emb-mean"]
        assert [t for action, t in paged if action == "page-in"].count("emb-mean") == 2
    finally:
        out = r.stop()
    assert "Traceback" not in out


def test_a_new_version_reloads_under_load_failing_no_request_and_a_pipeline_it_cannot_reproduce_is_refused(
        tmp_path: Path, embedders: dict[str, Path]) -> None:  # fmt: skip
    """Clients embedding without pause while apply publishes a new version: every request answered, by the
    old version then the new one only. Beside it, a model whose modules.json adds a Dense module fails
    to load, and a request for it is a 503 naming the file, not another model's vectors."""
    import httpx

    from zoo_agent.demo.tiny import build_tiny_embedder, sentence_transformers_layout

    world = World(tmp_path)
    world.artifact("e", "1", _files(embedders["mean"]))
    dense = _files(embedders["mean"])
    modules = json.loads(dense["modules.json"])
    dense["modules.json"] = json.dumps([*modules[:2], {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]).encode()
    world.artifact("d", "1", dense)
    tenants = {"emb": {"model": "e", "kind": "embedding", "pinned": True}, "dense": {"model": "d", "kind": "embedding"}}

    def publish() -> None:  # World.artifact writes its own index: ours again, then apply
        world.index.write_text(json.dumps({"models": world.models, "tenants": tenants, "hosts": {"h": {"tenants": list(tenants)}}}))
        assert world.run("apply").exit_code == 0

    publish()
    v2 = sentence_transformers_layout(build_tiny_embedder(tmp_path / "v2", WORDS, hidden=64, layers=2, seed=8), max_seq_length=MAX_TOKENS)
    r = Resident(world)
    seen: dict[int, list[float]] = {}
    failures: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                try:
                    resp = http.post(r.url + "/v1/embeddings", json={"model": "emb", "input": "the cat sat"})
                    if resp.status_code != 200:
                        failures.append(f"HTTP {resp.status_code}: {resp.text[:200]}")
                        continue
                    seen.setdefault(n, []).append(resp.json()["data"][0]["embedding"][0])
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    try:
        r.wait_ready()
        refused = httpx.post(r.url + "/v1/embeddings", json={"model": "dense", "input": "cat"}, timeout=120)
        assert refused.status_code == 503, refused.text
        assert "modules.json: module 'sentence_transformers.models.Dense' is not supported" in refused.json()["error"]["message"]
        old = httpx.post(r.url + "/v1/embeddings", json={"model": "emb", "input": "the cat sat"}, timeout=60).json()["data"][0]["embedding"][0]
        for t in threads:
            t.start()
        time.sleep(1)
        world.artifact("e", "2", _files(v2))
        publish()  # current moves; the resident follows it
        r.wait(lambda m: "emb e@2 (" in m.get("STATUS", ""), timeout=120)
        new = httpx.post(r.url + "/v1/embeddings", json={"model": "emb", "input": "the cat sat"}, timeout=60).json()["data"][0]["embedding"][0]
        assert new != old
        deadline = time.monotonic() + 60  # bounded: until every client has been answered by the new version
        while time.monotonic() < deadline and not all(len(seen.get(n, [])) and abs(seen[n][-1] - new) < 1e-6 for n in range(4)):
            time.sleep(0.1)
        assert 'zoo:reloads_total{result="ok",tenant="emb"} 1.0' in httpx.get(r.url + "/metrics", timeout=30).text
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join(timeout=60)
        out = r.stop()
    assert failures == []
    for values in seen.values():  # batched with other clients' texts or not: the same vector to float32's last bits
        versions = ["old" if abs(v - old) < 1e-6 else "new" if abs(v - new) < 1e-6 else repr(v) for v in values]
        assert set(versions) <= {"old", "new"} and versions[-1] == "new", versions
        assert "old" not in versions[versions.index("new"):], versions
    assert "Traceback" not in out


def test_route_similarity_and_auto_keep_mean_pooling_where_an_embedding_tenant_refuses_the_pipeline(tmp_path: Path,
                                                                                                  embedders: dict[str, Path]) -> None:  # fmt: skip
    """The embedder of route rules and ``<tenant>:auto`` read a model's declared pooling too, but a pipeline it cannot
    reproduce keeps the mean pooling they always used (a warning), where an embedding tenant refuses to load it."""
    import shutil as files

    from zoo_agent.resident.embedder import Embedder
    from zoo_agent.resident.pooling import LayoutError

    model = Path(files.copytree(embedders["cls"], tmp_path / "dense"))
    assert Embedder(model).layout.modes == ("cls",)  # declared: read
    modules = json.loads((model / "modules.json").read_text())
    (model / "modules.json").write_text(json.dumps([*modules, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    lenient = Embedder(model)
    assert (lenient.layout.modes, lenient.layout.normalize, lenient.layout.declared) == (("mean",), True, False)
    with pytest.raises(LayoutError, match="modules.json: module 'sentence_transformers.models.Dense' is not supported"):
        Embedder(model, strict=True)


def test_a_burst_beyond_the_queue_is_429s_while_health_answers(served: Resident) -> None:
    """Sixty requests of 64 texts at once at a tenant holding 3 + 8: each is answered (200) or refused (429 with
    Retry-After), none fails otherwise, and /health answers meanwhile."""
    import httpx

    codes: list[int] = []
    retry: list[str | None] = []

    def one() -> None:
        resp = _embed(served, {"model": "emb-mean", "input": [TEXTS[i % len(TEXTS)] for i in range(64)]})
        codes.append(resp.status_code)
        if resp.status_code == 429:
            retry.append(resp.headers.get("retry-after"))

    threads = [threading.Thread(target=one) for _ in range(60)]
    for t in threads:
        t.start()
    started = time.monotonic()
    assert httpx.get(served.url + "/health", timeout=2).status_code == 200 and time.monotonic() - started < 2
    for t in threads:
        t.join(120)
    assert set(codes) == {200, 429} and len(codes) == 60, codes  # measured: 11 answered (3 + 8 places), 49 refused
    assert all(r is not None for r in retry)
