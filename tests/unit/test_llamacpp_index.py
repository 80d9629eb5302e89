"""llama.cpp in the index (issue #33): gguf models and adapters, the backend's fields, and the
memory fit from a GGUF header (``gguf``, llama.cpp's own reader) at the declared ``max_context``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.index import SHA_A, SHA_B, SHA_C
from zoo_agent.errors import Problem
from zoo_agent.index.checks import semantic_problems
from zoo_agent.index.fit import Footprint, check_host, gguf_config, kv_bytes, read_config, tenant_footprint
from zoo_agent.index.model import DEFAULT_MAX_CONTEXT, Index

gguf = pytest.importorskip("gguf")

GiB = 1024**3
#: Llama-3.2-3B's published shape (its config.json, and its GGUF header's llama.* keys).
LLAMA_3B = {"block_count": 28, "attention.head_count": 24, "attention.head_count_kv": 8, "embedding_length": 3072,
            "attention.key_length": 128, "attention.value_length": 128, "context_length": 131072}  # fmt: skip
#: About 1.9 GiB: the size of a Llama-3.2-3B q4_k_m file.
Q4_K_M_BYTES = 2_019_377_696


def write_gguf(path: Path, arch: str = "llama", shape: dict[str, int] | None = None) -> Path:
    """A GGUF file with a real model's metadata and one tiny tensor (the fit reads the header only)."""
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (shape or LLAMA_3B).items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_header_gives_the_models_shape(tmp_path: Path) -> None:
    config = gguf_config(write_gguf(tmp_path / "m.gguf"))
    assert config == {"gguf_architecture": "llama", "gguf_tensor_bytes": 4 * 8 * 4, "num_hidden_layers": 28, "num_attention_heads": 24,
                      "num_key_value_heads": 8, "head_dim": 128, "hidden_size": 3072, "max_position_embeddings": 131072}  # fmt: skip
    # read_config falls back to the header where a GGUF version has no config.json; a split set's part 1 holds it
    (tmp_path / "v").mkdir()
    write_gguf(tmp_path / "v" / "m-00001-of-00002.gguf")
    (tmp_path / "v" / "m-00002-of-00002.gguf").write_bytes(b"GGUF" + bytes(20))
    assert read_config(tmp_path / "v") == config


@pytest.mark.parametrize("data", [b"", b"GGUF", b"NOPE" + bytes(40), b"GGUF\x03\0\0\0" + (2**40).to_bytes(8, "little") + bytes(8),
                                  b"GGUF\x03\0\0\0" + bytes(8) + (2**40).to_bytes(8, "little"), b"GGUF\x03\0\0\0" + bytes(8) + b"\x01" + bytes(7) + b"\xff" * 64])  # fmt: skip
def test_a_file_that_is_not_a_readable_gguf_is_no_config(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "m.gguf").write_bytes(data)
    assert gguf_config(tmp_path / "m.gguf") is None
    assert read_config(tmp_path) is None


def test_kv_at_the_declared_context_slots_and_cache_type() -> None:
    config = {"num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072}
    per_token_f16 = 2 * 28 * 8 * 128 * 2  # 112 KiB
    assert kv_bytes(config, dtype="auto", max_batch=1, max_context=4096, cache_type="f16") == per_token_f16 * 4096  # 448 MiB
    assert kv_bytes(config, dtype="auto", max_batch=3, max_context=4096, cache_type="f16") == 3 * per_token_f16 * 4096
    assert kv_bytes(config, dtype="auto", max_batch=1, max_context=4096, cache_type="q8_0") == per_token_f16 * 4096 * 34 // 64
    # declared nothing: the model's own 131072, capped at the documented default
    assert kv_bytes(config, dtype="auto", max_batch=1, cache_type="f16") == per_token_f16 * DEFAULT_MAX_CONTEXT


def _model(path: str = "Llama-3.2-3B-Instruct-Q4_K_M.gguf", size: int = Q4_K_M_BYTES, fmt: str = "gguf") -> dict[str, Any]:
    return {"version": "1", "source": {"type": "file", "path": "m"}, "license": "other", "format": fmt,
            "files": [{"path": path, "sha256": SHA_A, "size": size}]}  # fmt: skip


def _fleet(n: int, budget: str, **resources: Any) -> Index:
    return Index.model_validate({
        "models": {f"m{i}": _model() for i in range(n)},
        "tenants": {f"t{i}": {"model": f"m{i}", "backend": "llama.cpp", "resources": resources} for i in range(n)},
        "hosts": {"h": {"tenants": [f"t{i}" for i in range(n)], "memory_budget": budget}},
    })  # fmt: skip


def _fits_at_once(idx: Index, config: dict[str, Any], budget: int) -> int:
    sizes = sorted(tenant_footprint(idx, t, config).total for t in idx.tenants)
    return max(k for k in range(len(sizes) + 1) if sum(sizes[:k]) <= budget)


def test_five_3b_q4_k_m_tenants_share_an_8_gib_gpu_two_or_three_at_a_time(tmp_path: Path) -> None:
    """Seed 001's headline, on paper: from the header's numbers, at max_context 4096."""
    config = gguf_config(write_gguf(tmp_path / "m.gguf"))
    assert config is not None
    one_slot = _fleet(5, "8G", max_context=4096, max_batch=1)
    assert tenant_footprint(one_slot, "t0", config) == Footprint(Q4_K_M_BYTES, 2 * 28 * 8 * 128 * 2 * 4096)
    assert _fits_at_once(one_slot, config, 8 * GiB) == 3
    assert check_host(one_slot, "h", {t: tenant_footprint(one_slot, t, config) for t in one_slot.tenants}) == []
    two_slots = _fleet(5, "8G", max_context=4096, max_batch=2)
    assert _fits_at_once(two_slots, config, 8 * GiB) == 2
    q8_cache = _fleet(5, "8G", max_context=4096, max_batch=2, kv_cache_type="q8_0")
    assert _fits_at_once(q8_cache, config, 8 * GiB) == 3


def test_the_fit_refuses_a_context_that_does_not_fit_and_accepts_a_smaller_one(tmp_path: Path) -> None:
    config = gguf_config(write_gguf(tmp_path / "m.gguf"))
    full = _fleet(1, "8G", max_context=131072, max_batch=1)  # the model's own context: 14 GiB of KV alone
    problems = check_host(full, "h", {"t0": tenant_footprint(full, "t0", config)})
    assert [p.pointer for p in problems] == ["/hosts/h/memory_budget"]
    assert "tenant t0 needs 17.1 GB (weights 2.0 GB + KV 15.0 GB), more than the whole budget" in problems[0].message
    smaller = _fleet(1, "8G", max_context=16384, max_batch=1)
    assert check_host(smaller, "h", {"t0": tenant_footprint(smaller, "t0", config)}) == []


def _problems(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p.pointer, p.message) for p in semantic_problems(Index.model_validate(doc)) if isinstance(p, Problem)]


LORA = {"version": "1", "source": {"type": "file", "path": "l"}, "license": "MIT", "base_model": "m", "rank": 8}

CHECKS = [
    ("llama.cpp on gguf", {"m": _model()}, {}, {"backend": "llama.cpp", "resources": {"max_context": 4096, "kv_cache_type": "q8_0", "gpu_layers": 99}}, []),
    ("llama.cpp on safetensors", {"m": _model("model.safetensors", 10, "safetensors")}, {}, {"backend": "llama.cpp"},
     [("/tenants/t/backend", "backend 'llama.cpp' loads a 'gguf' model; model 'm' has format 'safetensors'")]),
    ("transformers on gguf", {"m": _model()}, {}, {},
     [("/tenants/t/backend", "backend 'transformers' loads safetensors (or pickle) weights; model 'm' has format 'gguf'")]),
    ("llama.cpp fields on transformers", {"m": _model("model.safetensors", 10, "safetensors")}, {},
     {"resources": {"kv_cache_type": "f16", "gpu_layers": 0, "max_context": 512}},
     [("/tenants/t/resources/gpu_layers", "applies to backend 'llama.cpp' only; this tenant's backend is 'transformers'"),
      ("/tenants/t/resources/kv_cache_type", "applies to backend 'llama.cpp' only; this tenant's backend is 'transformers'")]),
    ("a gguf adapter on llama.cpp", {"m": _model()},
     {"l": {**LORA, "format": "gguf", "files": [{"path": "adapter.gguf", "sha256": SHA_B, "size": 5}]}}, {"backend": "llama.cpp", "loras": ["l"]}, []),
    ("a peft adapter on llama.cpp", {"m": _model()},
     {"l": {**LORA, "files": [{"path": "adapter_model.safetensors", "sha256": SHA_B, "size": 5}]}}, {"backend": "llama.cpp", "loras": ["l"]},
     [("/tenants/t/loras/0", "backend 'llama.cpp' loads GGUF adapters (convert_lora_to_gguf.py); adapter 'l' has format 'safetensors'")]),
    ("split files, all parts", {"m": {**_model(), "files": [{"path": f"m-0000{i}-of-00003.gguf", "sha256": SHA_C, "size": 9} for i in (1, 2, 3)]}},
     {}, {"backend": "llama.cpp"}, []),
    ("split files, a part missing", {"m": {**_model(), "files": [{"path": f"m-0000{i}-of-00003.gguf", "sha256": SHA_C, "size": 9} for i in (1, 3)]}},
     {}, {"backend": "llama.cpp"}, [("/models/m/files", "split GGUF 'm' has 3 parts; missing part 2")]),
    ("two quantizations in one model", {"m": {**_model(), "files": [{"path": p, "sha256": SHA_C, "size": 9} for p in ("a-q4_k_m.gguf", "a-q8_0.gguf")]}},
     {}, {"backend": "llama.cpp"},
     [("/models/m/files", "format 'gguf' loads one model file (or one split set); found 2: a-q4_k_m.gguf, a-q8_0.gguf; list one and its parts only")]),
    ("gguf without a .gguf file", {"m": _model("model.safetensors", 9)}, {}, {"backend": "llama.cpp"},
     [("/models/m/files", "format 'gguf' needs a .gguf file among the files")]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "models", "loras", "tenant", "expected"), CHECKS, ids=[c[0] for c in CHECKS])
def test_validate_matches_backend_and_format(name: str, models: dict[str, Any], loras: dict[str, Any], tenant: dict[str, Any],
                                             expected: list[tuple[str, str]]) -> None:  # fmt: skip
    assert _problems({"models": models, "loras": loras, "tenants": {"t": {"model": "m", **tenant}}}) == expected


@pytest.mark.parametrize(("resources", "field"), [({"max_context": 0}, "max_context"), ({"max_context": 2**21}, "max_context"),
                                                  ({"kv_cache_type": "q4_0"}, "kv_cache_type"), ({"gpu_layers": -1}, "gpu_layers")])  # fmt: skip
def test_the_schema_bounds_the_fields(resources: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Index.model_validate({"models": {"m": _model()}, "tenants": {"t": {"model": "m", "backend": "llama.cpp", "resources": resources}}})


def test_a_symlinked_gguf_is_not_followed_out_of_the_version(tmp_path: Path) -> None:
    outside = write_gguf(tmp_path / "outside.gguf")
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "model.gguf").symlink_to(outside)
    assert read_config(tmp_path / "v") is None
