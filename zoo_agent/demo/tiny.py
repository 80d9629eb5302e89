"""Build a tiny causal LM locally: random weights from a config, a tokenizer trained on
a few KB of text. For tests, benchmarks and the quick start, where no hub is reachable.

Deterministic for a given seed and library versions. Needs the ``resident`` extra.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

__all__ = ["CHAT_TEMPLATE", "QWEN2_05B_SHAPE", "build_tiny_model"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_TEXT = (
    "The zoo keeps every model pinned by its digest. A host serves one tenant at a time. "
    "Adapters change how the model answers. Ask a question and the model answers it. "
    "Hello, how are you? I am fine, thank you. What is a model zoo? It is a set of models. "
) * 40


#: A Qwen2-0.5B-shaped model (494M parameters with random weights), for benchmarks.
QWEN2_05B_SHAPE = {"hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2, "intermediate": 4864, "model_vocab": 151936, "tie": True}


def build_tiny_model(out: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 512, heads: int = 4,
                     kv_heads: int = 2, intermediate: int | None = None, model_vocab: int | None = None, tie: bool = False,
                     chat_template: str = CHAT_TEMPLATE, context: int = 4096) -> Path:  # fmt: skip
    """Write config, safetensors weights and tokenizer files into ``out``; return it.

    Byte for byte reproducible (the quick start's index pins these files): the config and
    tokenizer config are written out explicitly (no library version inside), and every
    weight is drawn from one seeded generator in name order, not by the library's init."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig

    specials = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([_TEXT], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    ))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": model_vocab or bpe.get_vocab_size(),
        "hidden_size": hidden, "intermediate_size": intermediate or hidden * 2, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": context,
        "eos_token_id": bpe.token_to_id("<|end|>"), "pad_token_id": bpe.token_to_id("<|pad|>"), "bos_token_id": None,
        "tie_word_embeddings": tie, "torch_dtype": "float32",
    }  # fmt: skip
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if tie and name == "lm_head.weight":
                continue  # the embeddings, shared
            if "norm" in name:
                weights[name] = torch.ones_like(tensor)
            else:
                weights[name] = (torch.randn(tensor.shape, generator=generator) * 0.02).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    bpe.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|end|>", "pad_token": "<|pad|>",
        "extra_special_tokens": specials[2:], "chat_template": chat_template, "model_max_length": context,
    })  # fmt: skip
    return out


def build_tiny_adapter(base: Path, out: Path, *, seed: int, rank: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                       base_name: str | None = None) -> Path:  # fmt: skip
    """A PEFT LoRA adapter for the model in ``base`` with random (not zero) weights, so it changes
    the output; reproducible like the model (explicit config, one seeded generator)."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    with warnings.catch_warnings():  # peft 0.21 reads a transformers 5 alias that warns; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in sorted(get_peft_model_state_dict(peft_model).items())}
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name or str(base), "r": rank,
        "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": sorted(targets), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True,
    })  # fmt: skip
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    import json

    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_tiny_embedder(out: Path, text: str, *, hidden: int = 256, seed: int = 0, layers: int = 0) -> Path:
    """A sentence-embedding model that is a bag of words: a 0-layer BERT whose position and
    segment embeddings are zero, so a mean-pooled vector is the average of its words' random
    (nearly orthogonal) vectors. Texts that share words are similar; enough for tests.
    ``layers`` > 0 adds random transformer layers (4x wide MLPs): the compute of a real
    sentence-embedding model of that shape (e.g. 6 x 384, MiniLM-L6's) for benchmarks, not its similarities."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = sorted({w for w in text.lower().replace(",", " ").replace(".", " ").replace(":", " ").split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    wordlevel = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    wordlevel.normalizer = normalizers.Lowercase()
    wordlevel.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordlevel, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                 intermediate_size=hidden * 4 if layers else hidden, max_position_embeddings=512))  # fmt: skip
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.normal_(0, 1)
        model.embeddings.word_embeddings.weight[1].zero_()  # unknown words say nothing
        model.embeddings.position_embeddings.weight.zero_()
        model.embeddings.token_type_embeddings.weight.zero_()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def sentence_transformers_layout(model_dir: Path, *, pooling: tuple[str, ...] = ("mean",), normalize: bool = True,
                                 max_seq_length: int | None = None) -> Path:  # fmt: skip
    """Make an embedder (``build_tiny_embedder``) a sentence-transformers model, as the hub's are laid
    out (sentence-transformers 5's files): ``modules.json`` (Transformer, Pooling, optional Normalize),
    ``1_Pooling/config.json`` with the ``pooling_mode_*`` flags, ``sentence_bert_config.json``."""
    import json

    from transformers import AutoConfig

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]  # fmt: skip
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (model_dir / "2_Normalize").mkdir(exist_ok=True)
    flags = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
             "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens", "weightedmean": "pooling_mode_weightedmean_tokens",
             "lasttoken": "pooling_mode_lasttoken"}  # fmt: skip
    width = AutoConfig.from_pretrained(model_dir, local_files_only=True).hidden_size
    (model_dir / "1_Pooling").mkdir(exist_ok=True)
    _write_json(model_dir / "1_Pooling" / "config.json", {"word_embedding_dimension": width, **{f: m in pooling for m, f in flags.items()}})
    _write_json(model_dir / "sentence_bert_config.json", {"max_seq_length": max_seq_length or 512, "do_lower_case": False})
    (model_dir / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    return model_dir


def main(argv: list[str] | None = None) -> int:
    """`python -m zoo_agent.demo.tiny DIR`: a tiny model in DIR/model and DIR/index.json
    that pins it for host 'local' (tenant 'chat'), ready for apply and resident."""
    import argparse
    import json

    from zoo_agent.index.fmt import canonical_text
    from zoo_agent.pin import Selection, pin_directory

    parser = argparse.ArgumentParser(prog="python -m zoo_agent.demo.tiny", description=main.__doc__)
    parser.add_argument("dir", type=Path)
    out = parser.parse_args(argv).dir
    model = build_tiny_model(out / "model")
    index = {
        "models": {"tiny": {"version": "1", "source": {"type": "file", "path": "model"}, "files": pin_directory(model, Selection()),
                            "license": "MIT", "description": "A tiny random-weight model built locally."}},
        "tenants": {"chat": {"model": "tiny", "generation": {"temperature": 0, "max_tokens": 32}}},
        "hosts": {"local": {"resident": "chat"}},
    }  # fmt: skip
    (out / "index.json").write_text(canonical_text(json.loads(json.dumps(index))))
    print(f"{out}/model and {out}/index.json written; next: zoo-agent apply --root {out}/zoo --index {out}/index.json --host local")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
