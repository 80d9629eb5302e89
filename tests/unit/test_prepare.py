"""A request made ready (issue #32): a prompt too long to fit, whatever its tokens, is refused before it is
tokenized. A stand-in backend counts the tokenizations: no model, no torch."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from zoo_agent.resident.sessions.turns import Refusal
from zoo_agent.resident.worker.bodies import ChatBody, CompletionBody
from zoo_agent.resident.worker.prepare import prepare
from zoo_agent.resident.worker.prompt_bound import longest_token

LONGEST = 16  # the stand-in tokenizer's longest token, in characters
CONTEXT = 4096


class Daemon:
    """What ``prepare`` asks of a backend: four characters a token, a context of 4096 (the Ollama backend's surface)."""

    sessions = None
    adapters = None

    def __init__(self) -> None:
        self.tokenized = 0

    def count_tokens(self, request: Any) -> int:
        self.tokenized += 1
        text = request.prompt if request.messages is None else "".join(m["content"] for m in request.messages)
        return max(1, len(text) // 4)

    def context_length(self) -> int:
        return CONTEXT


class Backend(Daemon):
    """And a tokenizer whose tokens are at most 16 characters (the transformers backend's surface)."""

    def longest_token(self) -> int:
        return LONGEST


def _state(max_prompt_tokens: int = 100_000, backend: type[Daemon] = Backend) -> Any:
    return SimpleNamespace(defaults={"max_tokens": 8, "temperature": 0.0, "top_p": 1.0}, backend=backend(), max_prompt_tokens=max_prompt_tokens,
                           route_sessions={}, summarizers={})  # fmt: skip


@pytest.mark.parametrize("chat", [True, False])
def test_a_prompt_longer_than_any_tokenization_that_fits_is_refused_before_it_is_tokenized(chat: bool) -> None:
    """Tokenizing a 1 MiB prompt took the preparing thread about a second before its 400."""
    state, text = _state(), "x" * (CONTEXT * LONGEST + 1)
    messages = [{"role": "user", "content": text[:100]}, {"role": "user", "content": text[100:]}] if chat else None
    body = ChatBody(model="t", messages=messages) if chat else CompletionBody(model="t", prompt=text)
    out = prepare(state, body, messages, None if chat else text, None, chat)
    field = "messages" if chat else "prompt"
    assert out == Refusal(400, f"{field}: {len(text)} characters, more than {CONTEXT} tokens can hold (this model's tokens are at most "
                               f"{LONGEST} characters)", param=field)  # fmt: skip
    assert state.backend.tokenized == 0


def test_the_prompt_limit_bounds_it_too_and_a_prompt_that_may_fit_is_counted() -> None:
    state = _state(max_prompt_tokens=100)
    refused = prepare(state, CompletionBody(model="t", prompt="x"), None, "x" * (100 * LONGEST + 1), None, False)
    assert isinstance(refused, Refusal) and "more than 100 tokens can hold" in refused.message and state.backend.tokenized == 0
    counted = prepare(state, CompletionBody(model="t", prompt="x"), None, "x" * (100 * LONGEST), None, False)
    assert isinstance(counted, Refusal) and counted.message == "prompt: 400 tokens, at most 100" and state.backend.tokenized == 1


def test_a_backend_that_does_not_know_its_longest_token_counts_every_prompt() -> None:
    """The Ollama daemon's tokenizer is its own: its count is already a cheap estimate."""
    state = _state(backend=Daemon)
    out = prepare(state, CompletionBody(model="t", prompt="x"), None, "x" * (CONTEXT * LONGEST + 1), None, False)
    assert isinstance(out, Refusal) and "tokens do not fit the model's context" in out.message and state.backend.tokenized == 1


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def _tokenizer(model: dict[str, Any], normalizer: Any = None, pre_tokenizer: Any = BYTE_LEVEL) -> dict[str, Any]:
    """A ``tokenizer.json`` document as the tokenizers library writes it."""
    return {"model": model, "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
            "added_tokens": [{"id": 9, "content": "<|im_start|>", "special": True}]}  # fmt: skip


BPE = {"type": "BPE", "byte_fallback": False, "vocab": {"a": 0, "ĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠ": 1, "==": 2}}


@pytest.mark.parametrize(("description", "longest"), [
    (_tokenizer(BPE), 16),  # byte-level (GPT-2, Qwen, Llama 3): an entry's character is a byte
    (_tokenizer({**BPE, "vocab": {"a": 0}}), 12),  # a special token's text is longer than any entry
    (_tokenizer({"type": "BPE", "byte_fallback": True, "vocab": {"▁the": 0, "<0x0A>": 1}}, pre_tokenizer={"type": "Metaspace"},
                normalizer={"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}), 12),  # Llama 2
    (_tokenizer(BPE, normalizer={"type": "NFC"}), 64),  # composition makes up to four code points one
    (_tokenizer({"type": "Unigram", "byte_fallback": True, "vocab": [["▁hello", -1.0], ["x", -2.0]]}, pre_tokenizer={"type": "Metaspace"}), 12),
    (_tokenizer({"type": "Unigram", "byte_fallback": False, "vocab": [["▁hello", -1.0]]}, pre_tokenizer={"type": "Metaspace"}), None),  # fuses unknowns
    (_tokenizer({"type": "WordPiece", "vocab": {"[UNK]": 0, "##ing": 1}}), None),  # a long unknown word is one [UNK]
    (_tokenizer({"type": "WordLevel", "vocab": {"[UNK]": 0}}), None),
    (_tokenizer(BPE, pre_tokenizer={"type": "Whitespace"}), None),  # drops whitespace: a million spaces are no token
    (_tokenizer(BPE, pre_tokenizer={"type": "Sequence", "pretokenizers": [{"type": "Split", "behavior": "Removed"}, BYTE_LEVEL]}), None),
    (_tokenizer(BPE, normalizer={"type": "BertNormalizer", "clean_text": True}), None),  # drops control characters
    (_tokenizer(BPE, normalizer={"type": "StripAccents"}), None),
    (_tokenizer(BPE, normalizer={"type": "Replace", "pattern": {"String": "  "}, "content": " "}), None),  # makes two one
    (_tokenizer(BPE, normalizer={"type": "Precompiled", "precompiled_charsmap": "AAAA"}), None),
    ({"model": None}, None),
])  # fmt: skip
def test_a_tokenizer_keeps_a_bound_only_when_every_character_lands_in_a_token(description: dict[str, Any], longest: int | None) -> None:
    assert longest_token(description) == longest
