"""``POST /v1/embeddings`` as OpenAI defines it, read and written once (issue #36): the router refuses
a bad request with it before a tenant is loaded for it, the embedding worker reads the same request
with it, and writes the answer with it. Pure: no torch, no I/O.

The request: ``model``; ``input``, a string or a list of at most ``MAX_INPUTS`` strings, none empty
(token-id arrays, which OpenAI also takes, are refused: a model's ids are not the client's to
choose); ``encoding_format`` ``float`` (default) or ``base64`` (each vector's little-endian float32
bytes, what OpenAI's client decodes); ``dimensions``, accepted only where it is the model's own
(shortening a vector is for models trained for it, and none here declares that); ``user`` is
ignored; ``priority`` is vLLM's, read by the router and the worker as for a generation. Every
problem is an ``ApiError`` naming the field, ``input[i]`` for one text; checks are linear in the
body and stop at the first problem.
"""

from __future__ import annotations

import base64
import json
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from zoo_agent.resident.wire.http import ApiError

__all__ = ["MAX_INPUTS", "PATH", "EmbeddingRequest", "answer", "parse_embeddings"]

PATH = "/v1/embeddings"
#: Texts in one request, as OpenAI allows: a longer list is a 413 naming ``input``.
MAX_INPUTS = 2048


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str, ...]
    base64: bool = False
    dimensions: int | None = None


def parse_embeddings(document: dict[str, Any]) -> EmbeddingRequest:
    """The request in a body already read as a JSON object; ``ApiError`` (400, or 413 for too many texts) naming the field."""
    model = document.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: required, a string", "model")
    inputs = _inputs(document.get("input"))
    form = document.get("encoding_format")
    if form is not None and form not in ("float", "base64"):
        raise ApiError(400, f"encoding_format: {str(form)[:40]!r} is not 'float' or 'base64'", "encoding_format")
    dimensions = document.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise ApiError(400, f"dimensions: a positive integer, not {str(dimensions)[:40]}", "dimensions")
    return EmbeddingRequest(model, inputs, form == "base64", dimensions)


def _inputs(given: object) -> tuple[str, ...]:
    if given is None:
        raise ApiError(400, "input: required, a string or a list of strings", "input")
    texts: list[Any] = [given] if isinstance(given, str) else given if isinstance(given, list) else []
    if not isinstance(given, str | list):
        raise ApiError(400, f"input: a string or a list of strings, not {_kind(given)}", "input")
    if not texts:
        raise ApiError(400, "input: an empty list; send at least one text", "input")
    if len(texts) > MAX_INPUTS:
        raise ApiError(413, f"input: {len(texts)} texts; at most {MAX_INPUTS} in one request", "input", "too_many_inputs")
    if _ids(texts) or all(isinstance(t, list) and t and _ids(t) for t in texts):
        raise ApiError(400, "input: token ids are not accepted here; send text (a string or a list of strings)", "input")
    for i, text in enumerate(texts):
        where = "input" if isinstance(given, str) else f"input[{i}]"
        if not isinstance(text, str):
            raise ApiError(400, f"{where}: must be a string, not {_kind(text)}", "input")
        if not text:
            raise ApiError(400, f"{where}: an empty string; every text needs at least one character", "input")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"{where}: not Unicode text (a lone surrogate at character {_surrogate(text)})", "input") from None
    return tuple(texts)


def _ids(values: list[Any]) -> bool:
    """A list of token ids (integers), as OpenAI also takes for ``input``."""
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _kind(value: object) -> str:
    """A JSON value's type, in JSON's words."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}.get(type(value), "a value")


def _surrogate(text: str) -> int:
    return next(i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF)


def answer(model: str, rows: Sequence[bytes], prompt_tokens: int, *, as_base64: bool) -> bytes:
    """OpenAI's answer: each row is one vector's float32 values, little-endian (as base64 sends them)."""
    data = []
    for i, row in enumerate(rows):
        if as_base64:
            embedding: Any = base64.b64encode(row).decode("ascii")
        else:
            values = array("f", row)
            if sys.byteorder != "little":
                values.byteswap()
            embedding = values.tolist()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    body = {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
    return json.dumps(body, allow_nan=False).encode()
