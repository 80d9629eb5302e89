"""One way to break a valid JSON document at random, for the property tests (issues #2, #17).

Each edit picks any place in the document (the root included) and replaces it, deletes it
or adds a sibling key beside it, with a value and a key drawn from the caller's strategies.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st


def paths(node: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON document, as a tuple of keys and indexes."""
    out = [at]
    if isinstance(node, dict):
        out += [p for key, value in node.items() for p in paths(value, (*at, key))]
    elif isinstance(node, list):
        out += [p for i, value in enumerate(node) for p in paths(value, (*at, i))]
    return out


def mutate(draw: st.DrawFn, document: Any, values: st.SearchStrategy[Any], keys: st.SearchStrategy[str], edits: int) -> Any:
    """``document`` (a copy of it) after one to ``edits`` random edits."""
    document = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, edits))):
        path = draw(st.sampled_from(paths(document)))
        value = copy.deepcopy(draw(values))  # sampled [] and {} are shared objects
        if not path:
            document = value
            continue
        parent = document
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(keys)] = value
        else:
            parent[path[-1]] = value
    return document
