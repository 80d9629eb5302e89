"""Load and check an index: read → parse → placeholders → structure → semantics.

Every problem is collected, not only the first (issue #2). The checks that need a parsed
``Index`` run once the structure is sound; placeholders are found in the raw document.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from zoo_agent.errors import InvalidIndex, Problem
from zoo_agent.index.checks import placeholder_problems, semantic_problems
from zoo_agent.index.model import Index
from zoo_agent.index.schema import pointer, structural_problems

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


def _finite(text: str) -> float:
    """``1e400`` would parse as infinity and ``fmt`` would write ``Infinity``, which is not JSON."""
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text[:40]} is out of range for a JSON number")
    return value


def _integer(text: str) -> int:
    """No field of an index holds an integer of more than 16 digits (``model.MAX_EXACT_INT``).
    Up to 40 are parsed, so the schema names the field; one of thousands hit Python's
    int-from-string limit, with a message about Python (issue #31)."""
    if len(text) > 40:
        raise ValueError(f"the number {text[:24]}… has {len(text.lstrip('-'))} digits; no field of an index holds such a number")
    return int(text)


#: An index nests about six levels; a deeper document is hostile or broken, and every
#: recursive reader after this one (pydantic, jsonschema, fmt) would overflow the stack.
MAX_DEPTH = 64


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
        raise fail(f"is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from exc
    if not text.strip():
        raise fail("is empty; an index is a JSON object such as {\"models\": {}}")
    try:
        document = json.loads(text, object_pairs_hook=_pairs, parse_constant=_reject_constant, parse_float=_finite,
                              parse_int=_integer)
    except json.JSONDecodeError as exc:
        raise fail(f"line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    except RecursionError:
        raise fail(f"nests deeper than {MAX_DEPTH} levels; an index is a few levels of objects") from None
    except ValueError as exc:
        raise fail(str(exc)) from exc
    problems = _shape_problems(document)
    if problems:
        raise InvalidIndex(name, problems)
    return document


def _shape_problems(document: Any) -> list[Problem]:
    """Duplicate keys, lone surrogates and excessive depth, in one walk with an explicit
    stack (a recursive walk is what a 100,000-deep document would overflow)."""
    problems: list[Problem] = []
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), document)]
    while stack:
        at, node = stack.pop()
        if len(at) > MAX_DEPTH:
            return [Problem(pointer(at[:MAX_DEPTH]), f"nests deeper than {MAX_DEPTH} levels; an index is a few levels of objects")]
        if isinstance(node, dict):
            for key in getattr(node, "duplicates", ()):
                problems.append(Problem(pointer((*at, key)), "key appears twice; JSON keeps only the last one"))
            for key in node:
                if _surrogate(key):
                    problems.append(Problem(pointer(at), f"a key holds a lone surrogate ({_escaped(key)}), which is not Unicode text"))
            stack.extend(((*at, key), value) for key, value in reversed(node.items()) if not _surrogate(key))
        elif isinstance(node, list):
            stack.extend(((*at, i), value) for i, value in reversed(list(enumerate(node))))
        elif isinstance(node, str) and _surrogate(node):
            problems.append(Problem(pointer(at), f"holds a lone surrogate ({_escaped(node)}), which is not Unicode text"))
    return problems


def _surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _escaped(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:60]


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
