"""Build a tiny causal LM locally: random weights from a config, a tokenizer trained on
a few KB of text. For tests, benchmarks and the quick start, where no hub is reachable.

Deterministic for a given seed and library versions. Needs the ``resident`` extra.
"""

from __future__ import annotations

from pathlib import Path

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
                     kv_heads: int = 2, intermediate: int | None = None, model_vocab: int | None = None, tie: bool = False) -> Path:  # fmt: skip
    """Write config, safetensors weights and tokenizer files into ``out``; return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([_TEXT], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    ))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|end|>", pad_token="<|pad|>",
        extra_special_tokens=specials[2:], chat_template=CHAT_TEMPLATE,
    )  # fmt: skip
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=model_vocab or bpe.get_vocab_size(), hidden_size=hidden, intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=tie,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_adapter(base: Path, out: Path, *, seed: int, rank: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                       base_name: str | None = None) -> Path:  # fmt: skip
    """A PEFT LoRA adapter for the model in ``base`` with random (not zero) weights, so it changes the output."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False))
    peft_model.save_pretrained(str(out))
    if base_name is not None:  # what the index calls the base, instead of the directory it was built from
        config = json.loads((out / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_name
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def build_tiny_embedder(out: Path, text: str, *, hidden: int = 256, seed: int = 0) -> Path:
    """A sentence-embedding model that is a bag of words: a 0-layer BERT whose position and
    segment embeddings are zero, so a mean-pooled vector is the average of its words' random
    (nearly orthogonal) vectors. Texts that share words are similar; enough for tests."""
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
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=0, num_attention_heads=4,
                                 intermediate_size=hidden, max_position_embeddings=512))  # fmt: skip
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.normal_(0, 1)
        model.embeddings.word_embeddings.weight[1].zero_()  # unknown words say nothing
        model.embeddings.position_embeddings.weight.zero_()
        model.embeddings.token_type_embeddings.weight.zero_()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m zoo_agent.resident.tiny DIR`: a tiny model in DIR/model and DIR/index.json
    that pins it for host 'local' (tenant 'chat'), ready for apply and resident."""
    import argparse
    import json

    from ..fmt import canonical_text
    from ..pin import Selection, pin_directory

    parser = argparse.ArgumentParser(prog="python -m zoo_agent.resident.tiny", description=main.__doc__)
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
