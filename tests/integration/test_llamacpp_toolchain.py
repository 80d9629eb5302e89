"""The llama.cpp toolchain (issue #33): the tiny transformers model converted to GGUF with the
pinned source's converter, quantized, and served by `llama-server` started directly, which
answers greedily token for token what transformers answers on the same weights (f32)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from tests.support.llamacpp import LlamaCpp, serve
from zoo_agent.index.fit import gguf_config, read_config

PROMPT = [5, 17, 42, 99, 7, 250, 3]  # token ids: both engines see exactly the same input
STEPS = 8
pytestmark = pytest.mark.resident  # transformers runs the tiny model in-process


def _transformers_greedy(model_dir: Path) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # from_pretrained returns it in eval mode
    ids = torch.tensor([PROMPT])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(STEPS):  # plain argmax, no generation config (eos, penalties) in between
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def _server_greedy(build: LlamaCpp, gguf: Path, log: Path) -> list[int]:
    with contextlib.contextmanager(serve)(build, gguf, log=log) as server:
        answer = server.post("/completion", {"prompt": PROMPT, "n_predict": STEPS, "temperature": 0, "top_k": 1, "ignore_eos": True,
                                             "cache_prompt": False, "return_tokens": True, "samplers": ["top_k"]})  # fmt: skip
    tokens = answer.get("tokens")
    assert isinstance(tokens, list), answer
    return [int(t) for t in tokens]


def test_llama_server_on_the_f32_gguf_answers_as_transformers(llama_cpp: LlamaCpp, tiny_gguf: dict[str, Path], tmp_path: Path) -> None:
    assert _server_greedy(llama_cpp, tiny_gguf["f32"], tmp_path / "f32.log") == _transformers_greedy(tiny_gguf["hf"])


def test_quantized_ggufs_serve_and_their_headers_fit(llama_cpp: LlamaCpp, tiny_gguf: dict[str, Path], tmp_path: Path) -> None:
    sizes = {k: tiny_gguf[k].stat().st_size for k in ("f32", "q8_0", "q4_k_m")}
    assert sizes["q4_k_m"] <= sizes["q8_0"] < sizes["f32"]
    hf = read_config(tiny_gguf["hf"])
    assert hf is not None
    for kind in ("f32", "q8_0", "q4_k_m"):
        header = gguf_config(tiny_gguf[kind])
        assert header is not None and header["gguf_architecture"] == "llama"
        for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            assert header[key] == hf[key], (kind, key)
        assert 0 < header["gguf_tensor_bytes"] < sizes[kind]
    assert len(_server_greedy(llama_cpp, tiny_gguf["q8_0"], tmp_path / "q8.log")) == STEPS


@pytest.mark.parametrize("kind", ["f32"])
def test_a_gguf_version_directory_fits_from_its_header(tiny_gguf: dict[str, Path], tmp_path: Path, kind: str) -> None:
    version = tmp_path / "v1"
    version.mkdir()
    (version / "model.gguf").symlink_to(tiny_gguf[kind])
    assert read_config(version) is None  # a symlink is not the zoo's file: nothing is followed out of it
    (version / "model.gguf").unlink()
    (version / "model.gguf").write_bytes(tiny_gguf[kind].read_bytes())
    assert read_config(version) == gguf_config(tiny_gguf[kind])


def test_the_demos_gguf_writer_writes_what_the_converter_writes(llama_cpp: LlamaCpp, tiny_gguf: dict[str, Path], tmp_path: Path) -> None:
    """`zoo-agent demo` writes its GGUF itself (a user's llama.cpp comes without the converter):
    tensor for tensor the converter's f32 file, the same tokenizer, the same greedy answer; its
    q8_0 file loads and answers; both byte for byte the same when written again (the index pins one)."""
    import gguf

    from zoo_agent.demo.gguf import build_tiny_gguf

    ours = build_tiny_gguf(tiny_gguf["hf"], tmp_path / "ours-f32.gguf", "f32")
    theirs_reader, ours_reader = gguf.GGUFReader(tiny_gguf["f32"]), gguf.GGUFReader(ours)
    theirs_tensors = {t.name: (t.tensor_type, t.shape.tolist(), bytes(t.data)) for t in theirs_reader.tensors}
    assert {t.name: (t.tensor_type, t.shape.tolist(), bytes(t.data)) for t in ours_reader.tensors} == theirs_tensors
    for key, field in theirs_reader.fields.items():
        if key.startswith(("tokenizer.", "llama.")) or key in ("general.architecture", "general.file_type"):
            assert ours_reader.fields[key].contents() == field.contents(), key
    assert _server_greedy(llama_cpp, ours, tmp_path / "ours.log") == _transformers_greedy(tiny_gguf["hf"])
    q8 = build_tiny_gguf(tiny_gguf["hf"], tmp_path / "ours-q8_0.gguf", "q8_0")
    assert q8.stat().st_size < ours.stat().st_size / 2
    assert len(_server_greedy(llama_cpp, q8, tmp_path / "q8.log")) == STEPS
    assert build_tiny_gguf(tiny_gguf["hf"], tmp_path / "again.gguf", "q8_0").read_bytes() == q8.read_bytes()
