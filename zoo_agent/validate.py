"""Load and check an index: read → parse → placeholders → structure → semantics.

Every problem is collected, not only the first (issue #2). The checks that need a parsed
``Index`` run once the structure is sound; placeholders are found in the raw document.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .checks import placeholder_problems, semantic_problems
from .errors import InvalidIndex, Problem
from .index import Index
from .schema import pointer, structural_problems

__all__ = ["check_document", "load_index", "read_document"]


class _Object(dict[str, Any]):
    """A parsed JSON object that remembers keys it saw twice (json keeps the last silently)."""

    duplicates: list[str]


def _pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_document(path: Path, display: str | None = None) -> Any:
    """Parse the file as strict JSON; any way it is unreadable is one ``InvalidIndex`` line."""
    name = display or str(path)

    def fail(message: str) -> InvalidIndex:
        return InvalidIndex(name, [Problem("", message)])

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise fail("no such file") from None
    except IsADirectoryError:
        raise fail("is a directory, not an index file") from None
    except PermissionError:
        raise fail("cannot be read: permission denied") from None
    except OSError as exc:
        raise fail(f"cannot be read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise fail(f"is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    if not text.strip():
        raise fail("is empty; an index is a JSON object such as {\"models\": {}}")
    try:
        document = json.loads(text, object_pairs_hook=_pairs, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise fail(f"line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except ValueError as exc:
        raise fail(str(exc)) from None
    duplicates = list(_duplicate_problems(document, ()))
    if duplicates:
        raise InvalidIndex(name, duplicates)
    return document


def _duplicate_problems(node: Any, at: tuple[str | int, ...]) -> Any:
    if isinstance(node, _Object):
        for key in node.duplicates:
            yield Problem(pointer((*at, key)), "key appears twice; JSON keeps only the last one")
        for key, value in node.items():
            yield from _duplicate_problems(value, (*at, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _duplicate_problems(value, (*at, i))


def check_document(document: Any) -> tuple[Index | None, list[Problem]]:
    """Every problem of a parsed document; the ``Index`` too when there are none.

    pydantic (strict, compiled) decides whether the structure is sound; jsonschema, far
    slower on a large index, runs only to explain a document that pydantic rejects.
    Both come from the same models; a property test keeps them in agreement.
    """
    problems = list(placeholder_problems(document))
    try:
        idx: Index | None = Index.model_validate(document, strict=True)
    except ValidationError as exc:
        idx, rejected = None, exc
    if idx is None or problems:
        stubbed = {p.pointer for p in problems}
        problems += [p for p in structural_problems(document) if p.pointer not in stubbed]
        if not problems:  # the schema accepts what pydantic refused: report pydantic's words
            problems = [Problem(pointer(map(str, e["loc"])), e["msg"]) for e in rejected.errors()]
        return None, problems
    problems = semantic_problems(idx)
    return (None if problems else idx), problems


def load_index(path: Path, display: str | None = None) -> Index:
    """The index at ``path``, or ``InvalidIndex`` listing every problem."""
    idx, problems = check_document(read_document(path, display))
    if idx is None:
        raise InvalidIndex(display or str(path), problems)
    return idx
