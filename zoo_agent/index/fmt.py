"""Canonical formatting of an index, so two people's edits merge cleanly.

Keys inside an entry follow the order the pydantic models declare them (unknown keys
last, sorted), ids are sorted, files are sorted by path, 2-space indent. Works on any
JSON document, valid or not, so ``fmt`` can run before ``validate``.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from typing import Any, Union

from pydantic import BaseModel

from zoo_agent.index.model import FileEntry, Index

__all__ = ["canonical_text", "diff"]


def canonical_text(document: Any) -> str:
    return json.dumps(_order(document, Index), indent=2, ensure_ascii=False) + "\n"


def diff(before: str, after: str, name: str) -> str:
    lines = difflib.unified_diff(
        before.splitlines(keepends=True), after.splitlines(keepends=True), f"{name}", f"{name} (canonical)"
    )
    return "".join(lines)


def _strip(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _order(node: Any, annotation: Any) -> Any:
    annotation = _strip(annotation)
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return _order_union(node, typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _order_model(node, annotation) if isinstance(node, dict) else node
    if origin is dict and isinstance(node, dict):
        value_type = typing.get_args(annotation)[1]
        return {key: _order(node[key], value_type) for key in sorted(node)}
    if origin is list and isinstance(node, list):
        item_type = _strip(typing.get_args(annotation)[0])
        items = [_order(item, item_type) for item in node]
        if item_type is FileEntry and all(isinstance(i, dict) and isinstance(i.get("path"), str) for i in items):
            items.sort(key=lambda item: item["path"])
        return items
    return node


def _order_union(node: Any, options: tuple[Any, ...]) -> Any:
    """Pick the union member that fits: a model whose 'type' literal matches, else the first."""
    models = [opt for opt in map(_strip, options) if isinstance(opt, type) and issubclass(opt, BaseModel)]
    for model in models:
        type_field = model.model_fields.get("type")
        if type_field is not None and isinstance(node, dict) and node.get("type") in typing.get_args(type_field.annotation):
            return _order_model(node, model)
    return _order(node, models[0]) if models and isinstance(node, dict) else node


def _order_model(node: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        key = field.alias or name
        if key in node:
            out[key] = _order(node[key], field.annotation)
    for key in sorted(set(node) - set(out)):
        out[key] = node[key]
    return out
