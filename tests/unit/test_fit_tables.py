"""The memory fit as tables of literal inputs (issue #20): sizes, KV budgets, refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.index import SHA_A, SHA_B, SHA_C
from zoo_agent.index.fit import (
    DEFAULT_CONTEXT,
    Footprint,
    check_host,
    estimate,
    kv_bytes,
    parse_memory,
    read_config,
    tenant_footprint,
)
from zoo_agent.index.model import DEFAULT_MAX_CONTEXT, Index, ModelEntry, Resources

GiB = 1024**3
#: QWEN declares 32768 positions; a tenant that declares no max_context gets at most DEFAULT_MAX_CONTEXT (issue #33).
QWEN_CONTEXT = DEFAULT_MAX_CONTEXT

MEMORY = [("123", 123), ("1K", 1024), ("512M", 512 * 1024**2), ("8G", 8 * GiB), ("2T", 2 * 1024**4), ("10", 10)]


@pytest.mark.parametrize(("spec", "expected"), MEMORY)
def test_parse_memory(spec: str, expected: int) -> None:
    assert parse_memory(spec) == expected


@pytest.mark.parametrize("spec", ["", "0", "8GB", "8g", "-1G", "1.5G", " 8G", "G", "08G", "8P"])
def test_parse_memory_refuses(spec: str) -> None:
    with pytest.raises(ValueError, match="systemd's notation"):
        parse_memory(spec)


QWEN = {"num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_size": 896,
        "max_position_embeddings": 32768, "torch_dtype": "bfloat16"}  # fmt: skip

KV = [
    # (name, config, dtype, max_batch, expected)
    ("grouped-query, dtype from config", QWEN, "auto", 1, 2 * 24 * 2 * 64 * 2 * QWEN_CONTEXT),
    ("max_batch multiplies", QWEN, "auto", 16, 16 * 2 * 24 * 2 * 64 * 2 * QWEN_CONTEXT),
    ("float32 asked for", QWEN, "float32", 1, 2 * 24 * 2 * 64 * 4 * QWEN_CONTEXT),
    ("float16 asked for", QWEN, "float16", 1, 2 * 24 * 2 * 64 * 2 * QWEN_CONTEXT),
    ("no kv heads: all heads", {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "max_position_embeddings": 128},
     "float16", 1, 2 * 2 * 4 * 16 * 2 * 128),
    ("explicit head_dim wins", {**QWEN, "head_dim": 128}, "auto", 1, 2 * 24 * 2 * 128 * 2 * QWEN_CONTEXT),
    ("auto without a dtype: float32", {k: v for k, v in QWEN.items() if k != "torch_dtype"}, "auto", 1, 2 * 24 * 2 * 64 * 4 * QWEN_CONTEXT),
    ("newer 'dtype' key", {**{k: v for k, v in QWEN.items() if k != "torch_dtype"}, "dtype": "float16"}, "auto", 1,
     2 * 24 * 2 * 64 * 2 * QWEN_CONTEXT),
    ("gpt-2 names", {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}, "float32", 2, 2 * 2 * 12 * 12 * 64 * 4 * 1024),
    ("no context: the default", {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 8}, "float32", 1,
     2 * 2 * 2 * 4 * 4 * DEFAULT_CONTEXT),
    ("max_seq_len", {"num_hidden_layers": 1, "num_attention_heads": 1, "hidden_size": 8, "max_seq_len": 100}, "float32", 1, 2 * 8 * 4 * 100),
    ("multimodal: text_config", {"model_type": "llava", "torch_dtype": "float16", "text_config": QWEN}, "auto", 1,
     2 * 24 * 2 * 64 * 2 * QWEN_CONTEXT),
    ("text_config dtype missing: outer one", {"torch_dtype": "float16", "text_config": {k: v for k, v in QWEN.items() if k != "torch_dtype"}},
     "auto", 1, 2 * 24 * 2 * 64 * 2 * QWEN_CONTEXT),
    ("not a decoder we know", {"model_type": "bert-ish"}, "float32", 4, 0),
    ("heads but no size", {"num_hidden_layers": 2, "num_attention_heads": 2}, "float32", 1, 0),
    ("booleans are not counts", {"num_hidden_layers": True, "num_attention_heads": 2, "hidden_size": 8}, "float32", 1, 0),
]


@pytest.mark.parametrize(("name", "config", "dtype", "batch", "expected"), KV, ids=[c[0] for c in KV])
def test_kv_bytes(name: str, config: dict[str, Any], dtype: str, batch: int, expected: int) -> None:
    assert kv_bytes(config, dtype=dtype, max_batch=batch) == expected


def _model(*files: tuple[str, int], source: dict[str, Any] | None = None) -> dict[str, Any]:
    shas = [SHA_A, SHA_B, SHA_C]
    return {"version": "1", "source": source or {"type": "file", "path": "m"}, "license": "MIT",
            "files": [{"path": p, "sha256": shas[i % 3], "size": s} for i, (p, s) in enumerate(files)]}  # fmt: skip


def test_estimate_counts_weight_files_only() -> None:
    model = ModelEntry.model_validate(_model(("config.json", 600), ("model-00001.safetensors", 1000), ("model-00002.safetensors", 500),
                                             ("tokenizer.json", 7000), ("w.gguf", 30)))  # fmt: skip
    assert estimate(model, Resources(), None) == Footprint(1530, 0)
    small = {"num_hidden_layers": 1, "num_attention_heads": 1, "hidden_size": 4, "max_position_embeddings": 10, "torch_dtype": "float16"}
    assert estimate(model, Resources(max_batch=3), small) == Footprint(1530, 2 * 1 * 1 * 4 * 2 * 10 * 3)
    assert estimate(model, Resources(max_batch=3, dtype="float32"), small).kv == 2 * 4 * 4 * 10 * 3


def test_footprint_total_and_describe() -> None:
    f = Footprint(1_000_000_000, 200_000_000)
    assert f.total == 1_200_000_000
    assert f.describe() == "1.2 GB (weights 1.0 GB + KV 200.0 MB)"


def _index(tenants: dict[str, dict[str, Any]], budget: str | None, sizes: dict[str, int], **host: Any) -> Index:
    doc: dict[str, Any] = {
        "models": {m: _model(("model.safetensors", s)) for m, s in sizes.items()},
        "tenants": {t: {"model": t, **extra} for t, extra in tenants.items()},
        "hosts": {"h": {"tenants": list(tenants), **({"memory_budget": budget} if budget else {}), **host}},
    }
    return Index.model_validate(doc)


def test_tenant_footprint_adds_adapters_and_the_embedder() -> None:
    doc = {
        "models": {"m": _model(("model.safetensors", 1000)), "emb": _model(("model.safetensors", 300))},
        "loras": {"l": {**_model(("adapter_model.safetensors", 40)), "base_model": "m", "rank": 4}},
        "tenants": {"t": {"model": "m", "loras": ["l"], "adapter_selection": {"embedding_model": "emb"}}},
    }
    assert tenant_footprint(Index.model_validate(doc), "t", None) == Footprint(1340, 0)


GB = 1_000_000_000

FIT = [
    # (name, tenants, budget, weights by tenant, footprints (total kv) by tenant, problem fragments)
    ("no budget: anything goes", {"a": {"pinned": True}, "b": {"pinned": True}}, None, {"a": 9 * GB, "b": 9 * GB}, {}, []),
    ("fits", {"a": {"pinned": True}, "b": {}}, "4G", {"a": 1 * GB, "b": 2 * GB}, {}, []),
    ("exactly the budget fits", {"a": {}}, "1000", {"a": 1000}, {}, []),
    ("one byte over", {"a": {}}, "1000", {"a": 1001}, {},
     ["tenant a needs 1.0 kB (weights 1.0 kB + KV 0 B), 1 byte more than the whole budget; the budget is 1000 (1.0 kB)"]),
    ("KV tips it over", {"a": {}}, "2G", {"a": 1 * GB}, {"a": 2 * GB},
     ["tenant a needs 3.0 GB (weights 1.0 GB + KV 2.0 GB), more than the whole budget; the budget is 2G (2.1 GB)"]),
    ("pinned together", {"chat": {"pinned": True}, "code": {"pinned": True}}, "4G", {"chat": 1_200_000_000, "code": 3_400_000_000}, {},
     ["pinned tenants chat (1.2 GB) and code (3.4 GB) need 4.6 GB together; the budget is 4G (4.3 GB)"]),
    ("unpinned ones page", {"a": {}, "b": {}, "c": {}}, "4G", {"a": 3 * GB, "b": 3 * GB, "c": 3 * GB}, {}, []),
    ("cannot load beside the pinned", {"a": {"pinned": True}, "b": {}}, "4G", {"a": 3 * GB, "b": 2 * GB}, {},
     ["tenant b needs 2.0 GB (weights 2.0 GB + KV 0 B), which cannot load beside the pinned tenant a (3.0 GB) (never evicted)"]),
]


@pytest.mark.parametrize(("name", "tenants", "budget", "weights", "kv", "fragments"), FIT, ids=[c[0] for c in FIT])
def test_check_host(name: str, tenants: dict[str, Any], budget: str | None, weights: dict[str, int], kv: dict[str, int],
                    fragments: list[str]) -> None:  # fmt: skip
    idx = _index(tenants, budget, weights)
    footprints = {t: Footprint(w, kv.get(t, 0)) for t, w in weights.items()}
    problems = check_host(idx, "h", footprints)
    assert {p.pointer for p in problems} <= {"/hosts/h/memory_budget"}
    assert len(problems) == len(fragments), problems
    for problem, fragment in zip(problems, fragments, strict=True):
        assert fragment in problem.message, problem.message


def test_check_host_counts_weights_for_a_tenant_it_was_not_given() -> None:
    idx = _index({"a": {}}, "1K", {"a": 2048})
    assert [p.message for p in check_host(idx, "h", {})] == [
        "tenant a needs 2.0 kB (weights 2.0 kB + KV 0 B), more than the whole budget; the budget is 1K (1.0 kB)"]
    assert "2.0 kB of weights alone" in check_host(idx, "h", {}, weights_only=True)[0].message


def test_resident_is_one_tenant() -> None:
    idx = Index.model_validate({"models": {"m": _model(("w.safetensors", 10))}, "tenants": {"t": {"model": "m"}},
                                "hosts": {"h": {"resident": "t"}, "e": {}, "both": {"tenants": ["t"]}}})  # fmt: skip
    assert idx.hosts["h"].served() == ("t",)
    assert idx.hosts["e"].served() == ()
    assert idx.hosts["both"].served() == ("t",)


def test_read_config(tmp_path: Path) -> None:
    assert read_config(tmp_path) is None
    (tmp_path / "config.json").write_text("{not json")
    assert read_config(tmp_path) is None
    (tmp_path / "config.json").write_text("[1]")
    assert read_config(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps(QWEN))
    assert read_config(tmp_path) == QWEN
