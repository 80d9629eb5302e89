"""A GGUF header is parsed once per file (issue #33's benchmark): ``gguf.GGUFReader`` builds an
object per vocabulary entry, so a real 152k-token header cost 15 s and 300 MB of the router's
memory (measured under load) at every page-in of a llama.cpp tenant, where the launch reads its
context from it. A published version never changes in place: a file of the same path, inode,
size and mtime is the same header."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from zoo_agent.index import fit

gguf = pytest.importorskip("gguf")


def write_gguf(path: Path, layers: int = 2, name: str = "") -> Path:
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    if name:
        writer.add_name(name)
    writer.add_uint32("llama.block_count", layers)
    writer.add_uint32("llama.attention.head_count", 4)
    writer.add_uint32("llama.embedding_length", 64)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def readers(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    opened: list[Path] = []
    real = gguf.GGUFReader

    def counting(path: Any, mode: str = "r") -> Any:
        opened.append(Path(path))
        return real(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    return opened


def test_a_header_is_parsed_once_and_its_config_is_a_copy(tmp_path: Path, readers: list[Path]) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    first = fit.read_config(tmp_path)
    assert first is not None and first["num_hidden_layers"] == 2
    first["num_hidden_layers"] = 99  # a caller's change is its own
    again = fit.read_config(tmp_path)
    assert again is not None and again["num_hidden_layers"] == 2
    assert fit.gguf_config(path) == again
    assert readers == [path]


def test_a_changed_file_is_parsed_again(tmp_path: Path, readers: list[Path]) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    assert (fit.gguf_config(path) or {})["num_hidden_layers"] == 2
    os.unlink(path)
    write_gguf(tmp_path / "m.gguf", layers=3, name="v2")  # replaced: another size (and inode or mtime)
    assert (fit.gguf_config(path) or {})["num_hidden_layers"] == 3
    path.write_bytes(b"GGUF")  # truncated in place
    assert fit.gguf_config(path) is None
    assert len(readers) == 2


def test_the_memo_is_bounded(tmp_path: Path, readers: list[Path]) -> None:
    paths = [write_gguf(tmp_path / f"m{i}.gguf") for i in range(3)]
    for path in paths * 2:
        fit.gguf_config(path)
    assert len(readers) == 3
    assert 0 < len(fit._GGUF_CONFIGS) <= fit._GGUF_CONFIGS_MOST
