"""How a sentence-embedding model turns token vectors into one vector, read from its directory as
sentence-transformers reads it (issue #36), and that pooling done.

A sentence-transformers model declares its pipeline in ``modules.json``: a ``Transformer`` (the
model and tokenizer; ``sentence_bert_config.json``'s ``max_seq_length`` and ``do_lower_case``), a
``Pooling`` (``1_Pooling/config.json``: ``pooling_mode`` cls, max, mean, mean_sqrt_len_tokens,
weightedmean or lasttoken, several concatenated in the order given; older files set
``pooling_mode_*`` flags) and an optional ``Normalize`` (L2); ``config_sentence_transformers.json``
may name a default prompt put before every text. That is what ``SentenceTransformer.encode``
computes (sentence-transformers 6: its pooling is followed here, left padding and half precision
included), and what ``/v1/embeddings`` answers. A directory without ``modules.json`` (a plain
transformers model) is pooled as the resident always pooled it for route similarity and
``<tenant>:auto``: mean over the tokens, normalised. Any other module (``Dense``, ``Router``,
custom code), or a prompt left out of the pooling, is a ``LayoutError``: an embedding tenant
refuses to load it, its vectors would not be the model's (``embedder.py`` says what the others do).

Reading is pure of torch (``read_layout``), bounded (``jsonbound``: each file at most 1 MiB) and
stays in the model's directory (a module's ``path`` that climbs out is refused); ``pool`` imports
torch and is called on the thread that owns the model.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoo_agent.jsonbound import JSONRefused, loads

__all__ = ["MODES", "Layout", "LayoutError", "pool", "read_layout"]

#: sentence-transformers' pooling modes; the legacy ``pooling_mode_*`` flags are read in this order.
MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
          "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens": "weightedmean",
          "pooling_mode_lasttoken": "lasttoken"}  # fmt: skip
_KINDS = ("Transformer", "Pooling", "Normalize")
_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json", "sentence_camembert_config.json",
            "sentence_albert_config.json", "sentence_xlm-roberta_config.json", "sentence_xlnet_config.json")  # fmt: skip
_MAX_FILE = 1 << 20


class LayoutError(ValueError):
    """The directory declares a pipeline this resident cannot reproduce: one line naming the file."""


@dataclass(frozen=True)
class Layout:
    """A model directory's embedding pipeline."""

    transformer: str = ""  # the Transformer module's directory, relative to the model's
    modes: tuple[str, ...] = ("mean",)
    normalize: bool = True
    max_seq_length: int | None = None  # sentence_bert_config.json's (None: the tokenizer's and model's own)
    lower_case: bool = False
    prompt: str = ""  # config_sentence_transformers.json's default prompt, put before every text
    declared: bool = False  # read from modules.json (else: the resident's own default)

    def describe(self) -> str:
        """``mean+normalize`` (from modules.json), ``mean+normalize (default)`` (nothing declared)."""
        return "+".join(self.modes) + ("+normalize" if self.normalize else "") + ("" if self.declared else " (default)")


def read_layout(model_dir: Path) -> Layout:
    """The pipeline ``model_dir`` declares (``modules.json``), or the default one; ``LayoutError`` when
    it declares one that is not Transformer, Pooling and an optional Normalize, in that order."""
    modules = _json(model_dir, "modules.json")
    if modules is None:
        return Layout()
    if not isinstance(modules, list) or not all(isinstance(m, dict) and isinstance(m.get("type"), str) for m in modules):
        raise LayoutError("modules.json: must be a list of modules, each with a 'type'")
    kinds = [_kind(m["type"]) for m in modules]
    if kinds not in (list(_KINDS[:2]), list(_KINDS)):
        other = next((m["type"] for m, k in zip(modules, kinds, strict=True) if k not in _KINDS), None)
        what = f"module {other[:100]!r} is not supported" if other else f"modules {', '.join(kinds)} are not supported in this order"
        raise LayoutError(f"modules.json: {what}; this resident embeds with Transformer, Pooling and an optional Normalize")
    transformer, pooling = (_subdir(m.get("path", ""), i) for i, m in enumerate(modules[:2]))
    settings = _sentence_config(model_dir, transformer)
    modes, include_prompt = _pooling(model_dir, pooling)
    prompt = _prompt(model_dir)
    if prompt and not include_prompt:
        raise LayoutError(f"{posixpath.join(pooling, 'config.json')}: include_prompt false leaves the default prompt out of the pooling; "
                          "not supported")  # fmt: skip
    return Layout(transformer, modes, len(kinds) == 3, settings.get("max_seq_length"), settings.get("do_lower_case") is True, prompt,
                  declared=True)  # fmt: skip


def _kind(name: str) -> str:
    """``sentence_transformers.models.Pooling`` (5.x) and ``sentence_transformers.sentence_transformer.modules.pooling.Pooling`` (6.x): Pooling."""
    last = name.rpartition(".")[2]
    return last if name.startswith("sentence_transformers.") and last in _KINDS else name


def _json(model_dir: Path, name: str) -> Any:
    """A JSON file of the model's directory (None when absent), read bounded."""
    try:
        with open(model_dir / name, "rb") as f:
            data = f.read(_MAX_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LayoutError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    try:
        return loads(data, limit=_MAX_FILE)
    except JSONRefused as exc:
        raise LayoutError(f"{name}: {exc}") from None


def _subdir(path: object, i: int) -> str:
    """A module's ``path``: a directory inside the model's (never absolute, never climbing out)."""
    if not isinstance(path, str) or "\\" in path or "\x00" in path or path.startswith("/") or ".." in path.split("/"):
        raise LayoutError(f"modules.json: module {i}'s path {str(path)[:80]!r} must be a directory inside the model's")
    normal = posixpath.normpath(path) if path else ""
    return "" if normal == "." else normal


def _sentence_config(model_dir: Path, transformer: str) -> dict[str, Any]:
    """The Transformer module's ``sentence_*_config.json`` (the first present, as sentence-transformers looks)."""
    for name in _CONFIGS:
        found = _json(model_dir, posixpath.join(transformer, name))
        if found is None:
            continue
        if not isinstance(found, dict):
            raise LayoutError(f"{name}: must be a JSON object")
        size = found.get("max_seq_length")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise LayoutError(f"{name}: max_seq_length must be a positive integer, got {str(size)[:40]}")
        return found
    return {}


def _pooling(model_dir: Path, pooling: str) -> tuple[tuple[str, ...], bool]:
    """The modes ``<pooling>/config.json`` sets, as sentence-transformers reads them (``pooling_mode``, one
    or a list; else the legacy flags in their order, mean when none is set), and its ``include_prompt``."""
    name = posixpath.join(pooling, "config.json")
    config = _json(model_dir, name)
    if not isinstance(config, dict):
        raise LayoutError(f"{name}: the Pooling module's config is missing or not a JSON object")
    named = config.get("pooling_mode")
    if named is None:
        modes = tuple(mode for flag, mode in _FLAGS.items() if config.get(flag) is True) or ("mean",)
    else:
        modes = tuple(named) if isinstance(named, list) else (named,)
        if not modes or not all(isinstance(m, str) and m in MODES for m in modes):
            raise LayoutError(f"{name}: pooling_mode {str(named)[:60]!r} is not among {', '.join(MODES)}")
    return modes, config.get("include_prompt", True) is not False


def _prompt(model_dir: Path) -> str:
    """The prompt ``config_sentence_transformers.json`` applies by default ("" when none)."""
    config = _json(model_dir, "config_sentence_transformers.json")
    if not isinstance(config, dict) or not config.get("default_prompt_name"):
        return ""
    prompts, name = config.get("prompts"), config["default_prompt_name"]
    prompt = prompts.get(name) if isinstance(prompts, dict) and isinstance(name, str) else None
    if not isinstance(prompt, str):
        raise LayoutError(f"config_sentence_transformers.json: default_prompt_name {str(name)[:40]!r} names no prompt")
    return prompt


def pool(hidden: Any, mask: Any, modes: tuple[str, ...], normalize: bool) -> Any:
    """Token vectors (batch x tokens x width) and their attention mask to one vector per row: each of
    ``modes`` in turn, concatenated, then L2-normalised if ``normalize``. As sentence-transformers 6
    pools: padding on either side, sums of half-precision vectors in float32."""
    import torch

    wide = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
    keep = mask.unsqueeze(-1).to(hidden.dtype)
    first = mask.to(torch.int32).argmax(dim=1)  # the first kept position: the left padding's length
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), first])
        elif mode == "max":
            out.append(hidden.masked_fill(keep == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            summed = (hidden * keep).sum(dim=1, dtype=wide)
            count = keep.sum(dim=1, dtype=wide).clamp(min=1e-9)
            out.append((summed / (count if mode == "mean" else torch.sqrt(count))).to(hidden.dtype))
        elif mode == "weightedmean":
            positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=wide).view(1, -1, 1) - first.view(-1, 1, 1)
            weights = mask.unsqueeze(-1).to(wide) * positions
            out.append(((hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)).to(hidden.dtype))
        else:  # lasttoken: the last position the mask keeps
            seq = hidden.shape[1]
            found, flipped = mask.flip(1).max(1)
            last = seq - torch.where(found == 0, seq - 1, flipped) - 1
            out.append((hidden * keep)[torch.arange(hidden.shape[0], device=hidden.device), last])
    vectors = torch.cat(out, dim=-1)
    return torch.nn.functional.normalize(vectors, p=2, dim=1) if normalize else vectors
