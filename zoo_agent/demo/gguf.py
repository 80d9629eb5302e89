"""The demo's tiny model as a GGUF file, for its llama.cpp tenant (issue #33).

llama.cpp's own converter (``convert_hf_to_gguf.py``) comes with its source, not with the
``llama-server`` a user installs, so the demo writes the file itself with ``gguf`` (llama.cpp's
Python package, a dependency already): the tiny Llama-shaped model's tensors under llama.cpp's
names, its query and key rows in llama.cpp's rotary order, its byte-level BPE tokenizer. Tensor
for tensor it is what the converter writes (a test compares them); reproducible byte for byte,
so the index pins it. No torch: the weights are read with safetensors' numpy reader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["build_tiny_gguf"]

#: Hugging Face Llama names -> llama.cpp's (the per-layer ones under ``model.layers.N.``).
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_TYPES = {"f32": ("F32", "ALL_F32"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}


def build_tiny_gguf(model_dir: Path, out: Path, kind: str = "q8_0") -> Path:
    """``model_dir`` (``build_tiny_model``'s output) as one GGUF file at ``out``: ``f32``, or ``q8_0``
    for every matrix (norms stay f32, as llama-quantize leaves them)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    if kind not in _TYPES:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(_TYPES)}")
    qtype, file_type = (getattr(gguf.GGMLQuantizationType, _TYPES[kind][0]), getattr(gguf.LlamaFileType, _TYPES[kind][1]))
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ValueError(f"{model_dir}: model_type {config.get('model_type')!r}; only the demo's Llama-shaped model is written")
    heads, kv_heads, hidden = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_type("model")
    writer.add_name(model_dir.name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_key_length(hidden // heads)
    writer.add_value_length(hidden // heads)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(writer, model_dir, config)
    weights = load_file(str(model_dir / "model.safetensors"))
    if config.get("tie_word_embeddings"):
        weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
    for name in sorted(weights):
        data = weights[name].astype(np.float32)
        if name.endswith("q_proj.weight"):
            data = _rotary_order(data, heads)
        elif name.endswith("k_proj.weight"):
            data = _rotary_order(data, kv_heads)
        if data.ndim > 1 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(_gguf_name(name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(_gguf_name(name), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _gguf_name(name: str) -> str:
    stem = name.removesuffix(".weight")
    if stem in _TOP:
        return _TOP[stem] + ".weight"
    parts = stem.split(".", 3)
    if len(parts) != 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit() or parts[3] not in _LAYER:
        raise ValueError(f"{name}: not a tensor of a Llama model")
    return f"blk.{parts[2]}.{_LAYER[parts[3]]}.weight"


def _rotary_order(weights: Any, heads: int) -> Any:
    """Each head's rows from the halves transformers' rotary embedding pairs to the interleaved pairs
    llama.cpp's rope uses (the converter's ``LlamaModel.permute``)."""
    shape = weights.shape
    return weights.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _tokenizer(writer: Any, model_dir: Path, config: dict[str, Any]) -> None:
    """The byte-level BPE tokenizer as llama.cpp's ``gpt2`` model (its pre-tokenizer is GPT-2's regex)."""
    import gguf

    spec = json.loads((model_dir / "tokenizer.json").read_text())
    by_id = {int(i): t for t, i in spec["model"]["vocab"].items()}
    special = {int(a["id"]) for a in spec.get("added_tokens", []) if a.get("special")}
    by_id.update({int(a["id"]): a["content"] for a in spec.get("added_tokens", [])})
    size = int(config["vocab_size"])
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if config.get("eos_token_id") is not None:
        writer.add_eos_token_id(int(config["eos_token_id"]))
    if config.get("pad_token_id") is not None:
        writer.add_pad_token_id(int(config["pad_token_id"]))
    template = json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template")
    if template:
        writer.add_chat_template(template)
