"""An embedding tenant in the index (issue #36): ``kind: "embedding"``, and what it cannot have, each refused by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.support.index import SHA_A, write_index
from zoo_agent.cli.main import cli
from zoo_agent.index.fit import tenant_footprint
from zoo_agent.index.load import check_document

EMBEDDER = {"version": "1", "source": {"type": "file", "path": "e"}, "license": "MIT",
            "files": [{"path": "model.safetensors", "sha256": SHA_A, "size": 1000}]}  # fmt: skip
CONFIG = {"num_hidden_layers": 6, "num_attention_heads": 12, "hidden_size": 384, "max_position_embeddings": 512}


def _with_embedder(doc: dict[str, Any], **tenant: Any) -> dict[str, Any]:
    doc["models"]["minilm"] = dict(EMBEDDER)
    doc["tenants"]["emb"] = {"model": "minilm", "kind": "embedding", **tenant}
    doc["hosts"]["edge-1"] = {"tenants": ["chat", "emb"]}
    return doc


def test_an_embedding_tenant_validates_and_counts_no_kv_cache(index_doc: dict[str, Any]) -> None:
    idx, problems = check_document(_with_embedder(index_doc, resources={"max_batch": 32, "max_context": 256}, pinned=True))
    assert problems == [] and idx is not None
    assert idx.tenants["emb"].kind == "embedding" and idx.tenants["chat"].kind == "generation"
    footprint = tenant_footprint(idx, "emb", CONFIG)
    assert (footprint.weights, footprint.kv) == (1000, 0)  # an encoder keeps no KV cache


CASES = [
    ("loras", {"loras": ["review"]}, "/tenants/emb/loras", "an embedding tenant has no adapters; remove 'loras'"),
    ("adapter_selection", {"adapter_selection": {"embedding_model": "minilm"}}, "/tenants/emb/adapter_selection", "no adapters to choose"),
    ("generation", {"generation": {"temperature": 0}}, "/tenants/emb/generation", "generates nothing; remove 'generation'"),
    ("empty generation", {"generation": {}}, "/tenants/emb/generation", "generates nothing"),
    ("sessions", {"sessions": {"keep": 3}}, "/tenants/emb/sessions", "keeps no conversations; remove 'sessions'"),
    ("max_loras", {"resources": {"max_loras": 2}}, "/tenants/emb/resources/max_loras", "has no adapters; remove 'max_loras'"),
    ("backend", {"backend": "llama.cpp"}, "/tenants/emb/backend", "is served by the 'transformers' backend; 'llama.cpp' serves generation only"),
    ("overflow", {"overflow": "peers"}, "/tenants/emb/overflow", "answered where it is served"),
    ("kind enum", {"kind": "rerank"}, "/tenants/emb/kind", 'expected one of "generation", "embedding", got "rerank"'),
]


@pytest.mark.parametrize(("name", "tenant", "pointer", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_what_an_embedding_tenant_cannot_have_is_refused_by_name(index_doc: dict[str, Any], name: str, tenant: dict[str, Any],
                                                                 pointer: str, fragment: str) -> None:  # fmt: skip
    _, problems = check_document(_with_embedder(index_doc, **tenant))
    assert any(p.pointer == pointer and fragment in p.message for p in problems), problems


def test_an_embedding_model_in_pickle_is_refused_at_the_tenant(index_doc: dict[str, Any]) -> None:
    doc = _with_embedder(index_doc)
    doc["models"]["minilm"].update(format="pickle", allow_pickle=True)
    _, problems = check_document(doc)
    assert [p.message for p in problems if p.pointer == "/tenants/emb/model"] == [
        "embedding tenant 'emb' embeds with transformers from safetensors; model 'minilm' has format 'pickle'"]


@pytest.mark.parametrize("where", ["default", "fallback", "rules", "summarizer"])
def test_a_route_never_names_an_embedding_tenant(index_doc: dict[str, Any], where: str) -> None:
    doc = _with_embedder(index_doc)
    route: dict[str, Any] = {"default": "chat"}
    pointer = {"default": "/routes/r/default", "fallback": "/routes/r/fallback/0", "rules": "/routes/r/rules/0/tenant",
               "summarizer": "/routes/r/summarizer"}[where]  # fmt: skip
    if where == "rules":
        route["rules"] = [{"tenant": "emb", "when": {"max_words": 3}}]
    elif where == "fallback":
        route["fallback"] = ["emb"]
    else:
        route[where] = "emb"
    doc["routes"] = {"r": route}
    _, problems = check_document(doc)
    assert any(p.pointer == pointer and "'emb' is an embedding tenant; a route names tenants that generate" in p.message for p in problems), problems


def test_validate_names_each_problem_in_one_line(tmp_path: Path, index_doc: dict[str, Any]) -> None:
    path = write_index(tmp_path / "index.json", _with_embedder(index_doc, loras=["review"], sessions={"keep": 1}))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert f"{path}: /tenants/emb/loras: an embedding tenant has no adapters; remove 'loras'" in lines
    assert f"{path}: /tenants/emb/sessions: an embedding tenant keeps no conversations; remove 'sessions'" in lines
