"""How many characters one token covers at most, read from a tokenizer's own description (issue #32).

A prompt of ``n`` characters is then at least ``n / longest`` tokens, so one too long to fit the model
is refused before it is tokenized (``prepare``). That holds only for a tokenizer that keeps every
character of the text in some token: a byte-level BPE (GPT-2, Qwen, Llama 3) or one with byte fallback
(Llama 2, Mistral, Gemma), under normalizers that at most compose characters (NFC: four code points into
one at most, as Greek's ᾄ) or replace one string by another no shorter. A tokenizer that drops text
(whitespace splitting, accent stripping, a precompiled map) or fuses unknown characters into one token
gets no bound: every prompt is tokenized, as before.
"""

from __future__ import annotations

from typing import Any

__all__ = ["longest_token"]

#: At most this many code points compose into one under NFC/NFKC (U+1F84: alpha, psili, oxia, ypogegrammeni).
COMPOSED = 4


def longest_token(description: dict[str, Any]) -> int | None:
    """Characters of text one token may stand for, at most, from ``tokenizer.json``'s document; None when no bound holds."""
    model = description.get("model")
    if not isinstance(model, dict):
        return None
    vocab = model.get("vocab")
    pieces = list(vocab) if isinstance(vocab, dict) else [p[0] for p in vocab if isinstance(p, list) and p] if isinstance(vocab, list) else []
    added = [t.get("content") for t in description.get("added_tokens") or [] if isinstance(t, dict)]
    longest = max((len(p) for p in [*pieces, *added] if isinstance(p, str)), default=0)
    shrink = _shrink(description.get("normalizer"))
    if not longest or shrink is None or not _keeps_every_character(model, description.get("pre_tokenizer")):
        return None
    return longest * shrink


def _keeps_every_character(model: dict[str, Any], pre_tokenizer: Any) -> bool:
    """Every character of the text ends up in a token of its own length or less: bytes, never one unknown token for many."""
    if model.get("type") not in ("BPE", "Unigram") or not _keeps_whitespace(pre_tokenizer):
        return False
    return bool(model.get("byte_fallback")) or _byte_level(pre_tokenizer)


def _byte_level(pre_tokenizer: Any) -> bool:
    if not isinstance(pre_tokenizer, dict):
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any(_byte_level(p) for p in pre_tokenizer.get("pretokenizers") or [])
    return pre_tokenizer.get("type") == "ByteLevel"


def _keeps_whitespace(pre_tokenizer: Any) -> bool:
    """No pre-tokenizer that drops text: the whitespace splitters, or a split whose matches are removed."""
    if pre_tokenizer is None:
        return True
    if not isinstance(pre_tokenizer, dict):
        return False
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return all(_keeps_whitespace(p) for p in pre_tokenizer.get("pretokenizers") or [])
    if kind == "Split":
        return pre_tokenizer.get("behavior") != "Removed"
    return kind in ("ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts")


def _shrink(normalizer: Any) -> int | None:
    """How many characters a normalizer may make into one, at most; None when it may drop text."""
    if normalizer is None:
        return 1
    if not isinstance(normalizer, dict):
        return None
    kind = normalizer.get("type")
    if kind == "Sequence":
        factor = 1
        for part in normalizer.get("normalizers") or []:
            shrink = _shrink(part)
            if shrink is None:
                return None
            factor *= shrink
        return factor
    if kind in ("NFC", "NFKC"):
        return COMPOSED
    if kind in ("NFD", "NFKD", "Lowercase", "Prepend"):
        return 1
    if kind == "Replace":  # one literal string by another at least as long (Llama's " " by "▁")
        pattern, content = normalizer.get("pattern"), normalizer.get("content")
        literal = pattern.get("String") if isinstance(pattern, dict) else None
        return 1 if isinstance(literal, str) and isinstance(content, str) and len(content) >= len(literal) else None
    return None
