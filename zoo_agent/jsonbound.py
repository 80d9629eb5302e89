"""One bounded JSON reader for every boundary where bytes come from someone else (issue #31).

A client's body, a peer's answer (whole or one SSE event), a worker's answer and a host's
``/health`` read by ``fleet status`` all go through :func:`loads`. Python's decoder
recurses once per level, so ``[[[…]]]`` 100,000 levels deep raised ``RecursionError``
where each caller expected ``ValueError``: a 500 or a traceback. Here every failure is a
:class:`JSONRefused` (a ``ValueError``), with one line that says what was wrong, and a
document nested deeper than :data:`MAX_DEPTH` is refused even where the decoder coped.
The index reader (``index/load.py``) keeps its own walk, which also finds duplicate keys
and lone surrogates, with the same depth.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["MAX_DEPTH", "JSONRefused", "loads"]

#: No document any of our boundaries reads is more than a few levels deep; an index, a
#: chat request with tool schemas, an answer, a health document all stay far below this.
MAX_DEPTH = 64


class JSONRefused(ValueError):
    """Bytes that are not a JSON document we accept: not UTF-8, not JSON, too deep or too large."""


def loads(data: bytes | bytearray | str, *, limit: int | None = None, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON document in ``data``; ``JSONRefused`` naming the problem otherwise.

    ``limit`` bounds the size in bytes before any parsing. ``NaN`` and ``Infinity`` are
    refused: they are not JSON (RFC 8259), and a client that reads our answers would choke;
    so is a number too large for a double (``1e999``), which would be written out as ``Infinity``.
    """
    if limit is not None and len(data) > limit:
        raise JSONRefused(f"larger than {limit} bytes")
    try:
        # Bytes are UTF-8 (RFC 8259 §8.1; a leading byte order mark may be ignored, and is):
        # json.loads would also guess UTF-16 and UTF-32.
        text = data if isinstance(data, str) else bytes(data).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise JSONRefused(f"not UTF-8 (byte at offset {exc.start})") from None
    try:
        document = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite)
    except RecursionError:
        raise JSONRefused(f"nests deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise JSONRefused(f"not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except JSONRefused:
        raise
    except ValueError:  # an integer past Python's digit limit (sys.get_int_max_str_digits)
        raise JSONRefused("not JSON we read (a number with too many digits)") from None
    if _deeper_than(document, max_depth):
        raise JSONRefused(f"nests deeper than {max_depth} levels")
    return document


def _refuse_constant(name: str) -> Any:
    raise JSONRefused(f"not JSON ({name} is not a JSON number)")


def _finite(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise JSONRefused(f"a number too large for a double ({text[:40]})")
    return value


def _deeper_than(document: Any, max_depth: int) -> bool:
    """Whether containers nest past ``max_depth``; an explicit stack of containers only,
    so a wide document of scalars costs one pass in C-level loops, and no recursion."""
    level: list[Any] = [document] if isinstance(document, (dict, list)) else []
    depth = 0
    while level:
        depth += 1
        if depth > max_depth:
            return True
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node) if isinstance(child, (dict, list))]
    return False
