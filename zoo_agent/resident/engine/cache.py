"""A left-padded batch cache's rows (issue #19): the ones that stay, or one alone for a session to save."""

from __future__ import annotations

from typing import Any

__all__ = ["join", "row", "select"]


def select(cache: Any, mask: Any, keep: list[int]) -> tuple[Any, Any]:
    """Rows ``keep`` of a left-padded cache, without the padding none of them needs."""
    import torch

    index = torch.tensor(keep, device=mask.device)
    mask = mask.index_select(0, index)
    start = int(mask.any(dim=0).to(torch.int8).argmax())
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, start:]
        layer.values = layer.values.index_select(0, index)[:, :, start:]
    return cache, mask[:, start:]


def row(cache: Any, mask: Any, i: int, config: Any) -> Any:
    """Row ``i`` alone, without its padding: what generate() would hand a session to save."""
    from transformers import DynamicCache

    start = int(mask.shape[1] - mask[i].sum())
    return DynamicCache([(layer.keys[i : i + 1, :, start:], layer.values[i : i + 1, :, start:]) for layer in cache.layers], config=config)


def join(cache: Any, mask: Any, new: Any, new_mask: Any) -> tuple[Any, Any]:
    """Two left-padded caches as one: the rows of ``cache``, then those of ``new``, padded to one length."""
    import torch
    import torch.nn.functional as F

    length = max(mask.shape[1], new_mask.shape[1])
    pad_rows, pad_new = length - mask.shape[1], length - new_mask.shape[1]
    for layer, added in zip(cache.layers, new.layers, strict=True):
        layer.keys = torch.cat([F.pad(layer.keys, (0, 0, pad_rows, 0)), F.pad(added.keys, (0, 0, pad_new, 0))])
        layer.values = torch.cat([F.pad(layer.values, (0, 0, pad_rows, 0)), F.pad(added.values, (0, 0, pad_new, 0))])
    return cache, torch.cat([F.pad(mask, (pad_rows, 0)), F.pad(new_mask, (pad_new, 0))])
