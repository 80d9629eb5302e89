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


def _state(max_context: int = 100_000, backend: type[Daemon] = Backend) -> Any:
    return SimpleNamespace(defaults={"max_tokens": 8, "temperature": 0.0, "top_p": 1.0}, backend=backend(), max_context=max_context,
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


def test_the_declared_context_bounds_it_too_and_a_prompt_that_may_fit_is_counted() -> None:
    state = _state(max_context=100)
    refused = prepare(state, CompletionBody(model="t", prompt="x"), None, "x" * (100 * LONGEST + 1), None, False)
    assert isinstance(refused, Refusal) and "more than 100 tokens can hold" in refused.message and state.backend.tokenized == 0
    counted = prepare(state, CompletionBody(model="t", prompt="x"), None, "x" * (100 * LONGEST), None, False)
    assert counted == Refusal(400, "prompt: 400 tokens do not fit the context of 100 tokens (resources.max_context); at most 99",
                              param="prompt", code="context_length_exceeded")  # fmt: skip
    assert state.backend.tokenized == 1


def test_a_backend_that_does_not_know_its_longest_token_counts_every_prompt() -> None:
    """The Ollama daemon's tokenizer is its own: its count is already a cheap estimate."""
    state = _state(backend=Daemon)
    out = prepare(state, CompletionBody(model="t", prompt="x"), None, "x" * (CONTEXT * LONGEST + 1), None, False)
    assert isinstance(out, Refusal) and "tokens do not fit the context of 4096 tokens" in out.message and state.backend.tokenized == 1


def _chat(tokens: int, max_tokens: int | None = None, session: str | None = None) -> tuple[ChatBody, list[dict[str, str]]]:
    """A chat body whose one message is ``tokens`` tokens to the stand-in tokenizer (four characters each)."""
    messages = [{"role": "user", "content": "abcd" * tokens}]
    return ChatBody.model_validate({"model": "t", "messages": messages, "max_tokens": max_tokens, "session": session}), messages


@pytest.mark.parametrize(("prompt", "field"), [(64, "messages"), (65, "messages"), (200, "messages")])
def test_a_prompt_that_leaves_no_room_in_max_context_is_a_400_naming_messages(prompt: int, field: str) -> None:
    """issue #33: the tenant's declared context is the one number; a prompt that fills it leaves no token to generate."""
    body, messages = _chat(prompt)
    out = prepare(_state(max_context=64), body, messages, None, None, True)
    assert out == Refusal(400, f"{field}: {prompt} tokens do not fit the context of 64 tokens (resources.max_context); at most 63",
                          param=field, code="context_length_exceeded")  # fmt: skip


def test_max_tokens_past_what_the_prompt_leaves_is_a_400_naming_max_tokens_and_inside_it_is_kept() -> None:
    body, messages = _chat(60, max_tokens=5)
    out = prepare(_state(max_context=64), body, messages, None, None, True)
    assert out == Refusal(400, "max_tokens: 5 with a prompt of 60 tokens passes the context of 64 tokens (resources.max_context); at most 4",
                          param="max_tokens", code="context_length_exceeded")  # fmt: skip
    body, messages = _chat(60, max_tokens=4)
    out = prepare(_state(max_context=64), body, messages, None, None, True)
    assert not isinstance(out, Refusal) and out.max_tokens == 4


def test_the_default_max_tokens_is_lowered_to_what_the_prompt_leaves() -> None:
    """A request that names no max_tokens asks for the tenant's default (8 here), at most what the context has left."""
    body, messages = _chat(60)
    out = prepare(_state(max_context=64), body, messages, None, None, True)
    assert not isinstance(out, Refusal) and out.max_tokens == 4
    body, messages = _chat(10)
    assert prepare(_state(max_context=64), body, messages, None, None, True).max_tokens == 8  # type: ignore[union-attr]


def test_a_model_whose_positions_end_before_the_declared_context_bounds_it() -> None:
    """A declared context past the model's own positions (4096 here) cannot be served past them."""
    body, messages = _chat(5000)
    out = prepare(_state(max_context=100_000, backend=Daemon), body, messages, None, None, True)
    assert isinstance(out, Refusal) and out.param == "messages" and "context of 4096 tokens" in out.message


@pytest.mark.parametrize(("max_tokens", "room"), [(None, 64 - 8), (20, 64 - 20), (5, 64 - 5)])
def test_the_session_budget_is_the_declared_context_less_the_completion(monkeypatch: pytest.MonkeyPatch, max_tokens: int | None, room: int) -> None:
    """What a session keeps of its transcript in the prompt: the same number the 400s use (issue #33)."""
    import zoo_agent.resident.worker.prepare as prepare_module

    seen: list[int] = []

    def turn(_model: Any, _sessions: Any, _sid: Any, _messages: Any, budget: Any, *_rest: Any) -> Refusal:
        seen.append(budget())
        return Refusal(400, "seen", param="session")

    monkeypatch.setattr(prepare_module, "session_turn", turn)
    body, messages = _chat(3, max_tokens=max_tokens, session="s1")
    assert prepare(_state(max_context=64), body, messages, None, None, True) == Refusal(400, "seen", param="session")
    assert seen == [room]


def test_a_default_longer_than_the_context_leaves_the_session_half_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import zoo_agent.resident.worker.prepare as prepare_module

    seen: list[int] = []

    def turn(*args: Any) -> Refusal:
        seen.append(args[4]())
        return Refusal(400, "seen", param="session")

    monkeypatch.setattr(prepare_module, "session_turn", turn)
    state = _state(max_context=64)
    state.defaults["max_tokens"] = 256
    body, messages = _chat(3, session="s1")
    prepare(state, body, messages, None, None, True)
    assert seen == [32]


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
