"""docs/llama-cpp.md's memory-fit table is what the fit computes (issue #33, seed 001's headline on paper).

Every row of the table (max_context, max_batch, cache type -> KV, per tenant, tenants at once) is
recomputed with ``zoo_agent/index/fit.py``'s functions from a GGUF header carrying Llama-3.2-3B's
published shape (28 layers, 24 heads, 8 KV heads, head size 128, hidden 3072, context 131072),
five tenants of its q4_k_m file (2,019,377,696 bytes, about 2.02 GB) on an 8 GiB budget. A row
that drifts from the fit, or a fit that changes under the docs, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO
from tests.support.index import SHA_A
from zoo_agent.index.fit import check_host, gguf_config, tenant_footprint
from zoo_agent.index.model import Index

gguf = pytest.importorskip("gguf")

GiB, MiB = 1 << 30, 1 << 20
BUDGET = 8 * GiB
Q4_K_M_BYTES = 2_019_377_696  # Llama-3.2-3B-Instruct-Q4_K_M.gguf
LLAMA_3B = {"block_count": 28, "attention.head_count": 24, "attention.head_count_kv": 8, "embedding_length": 3072,
            "attention.key_length": 128, "attention.value_length": 128, "context_length": 131072}  # fmt: skip
ROW = re.compile(r"^\| (\d+)(?: \(the model's own\))? \| (\d+) \| (f16|q8_0) \| ([\d.]+ [MG]iB) \| ([\d.]+ [MG]iB) \| (\d+|refused) \|$", re.M)


def header(path: Path) -> dict[str, Any]:
    """The fit's config from a real GGUF header of Llama-3.2-3B's shape (one tiny tensor: only the header is read)."""
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in LLAMA_3B.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = gguf_config(path)
    assert config is not None
    return config


def five(resources: dict[str, Any]) -> Index:
    model = {"version": "1", "source": {"type": "file", "path": "m"}, "license": "other", "format": "gguf",
             "files": [{"path": "Llama-3.2-3B-Instruct-Q4_K_M.gguf", "sha256": SHA_A, "size": Q4_K_M_BYTES}]}  # fmt: skip
    return Index.model_validate({
        "models": {f"m{i}": model for i in range(5)},
        "tenants": {f"t{i}": {"model": f"m{i}", "backend": "llama.cpp", "resources": resources} for i in range(5)},
        "hosts": {"h": {"tenants": [f"t{i}" for i in range(5)], "memory_budget": "8G"}},
    })  # fmt: skip


def shown(text: str) -> tuple[float, int, int]:
    """'448 MiB' -> (448.0, MiB, 0 decimals)."""
    number, unit = text.split()
    return float(number), MiB if unit == "MiB" else GiB, len(number.partition(".")[2])


def rows() -> list[tuple[str, ...]]:
    text = (REPO / "docs" / "llama-cpp.md").read_text()
    section = text[text.index("## The memory fit"): text.index("## How the resident runs it")]
    return ROW.findall(section)


def test_the_docs_show_the_table() -> None:
    assert len(rows()) >= 4, "docs/llama-cpp.md: the memory fit's table of Llama-3.2-3B rows is missing or reshaped"


@pytest.mark.parametrize("row", rows(), ids=lambda r: "-".join(r[:3]))
def test_each_row_is_what_the_fit_computes(tmp_path: Path, row: tuple[str, ...]) -> None:
    context, batch, cache, kv, per_tenant, at_once = row
    config = header(tmp_path / "m.gguf")
    idx = five({"max_context": int(context), "max_batch": int(batch), "kv_cache_type": cache})
    footprints = {t: tenant_footprint(idx, t, config) for t in idx.tenants}
    fp = footprints["t0"]
    assert fp.weights == Q4_K_M_BYTES
    assert fp.kv == 2 * 28 * 8 * 128 * int(context) * int(batch) * (2 if cache == "f16" else 34 / 32)
    for figure, actual in ((kv, fp.kv), (per_tenant, fp.total)):
        value, unit, decimals = shown(figure)
        assert round(actual / unit, decimals) == value, f"docs/llama-cpp.md shows {figure}, the fit {actual / unit:.3f}"
    problems = check_host(idx, "h", footprints)
    if at_once == "refused":
        assert fp.total > BUDGET
        assert [p.pointer for p in problems] == ["/hosts/h/memory_budget"] * 5
    else:
        assert problems == []
        assert int(at_once) == BUDGET // fp.total  # five of one size: how many the budget holds at once
        assert 2 <= int(at_once) <= 3 < 5  # seed 001: five 3B models page through an 8 GiB budget, two or three at a time
