"""Random and mutated indexes never crash validate: only InvalidIndex, exit 2 (issue #2)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.index import VALID_INDEX
from tests.support.mutate import mutate
from zoo_agent.cli.main import cli
from zoo_agent.errors import InvalidIndex
from zoo_agent.index.load import load_index

_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=70)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
# Values that get past the first checks, so deep rules get exercised too.
_plausible = st.sampled_from(
    ["qwen", "llama", "review", "chat", "../x", "a//b", "x.bin", "m.py", "TODO-STUB-x", "0" * 64, "a" * 64, "hf", "file",
     "ollama", "url", "Apache-2.0", "main", "1.tmp", 0, -1, 1, True, None, [], {}, ["review", "review"]]
)  # fmt: skip


@st.composite
def mutated_index(draw: st.DrawFn) -> Any:
    keys = st.text(max_size=8) | st.sampled_from(["version", "files", "loras", "Bad"])
    return mutate(draw, VALID_INDEX, _plausible | _json, keys, edits=4)


def _check(document_text: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.json"
        path.write_bytes(document_text)
        try:
            load_index(path)
        except InvalidIndex as exc:
            assert exc.exit_code == 2
            assert all(len(line.splitlines()) == 1 for line in exc.lines())
            assert all(line.startswith(f"{path}: ") for line in exc.lines())


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_index())
def test_mutated_indexes_only_raise_invalid_index(document: Any) -> None:
    _check(json.dumps(document).encode())


@settings(max_examples=800, deadline=None)
@given(_json)
def test_random_json_only_raises_invalid_index(document: Any) -> None:
    _check(json.dumps(document).encode())


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_bytes_only_raise_invalid_index(raw: bytes) -> None:
    _check(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_index())
def test_cli_never_prints_a_traceback(document: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.json"
        path.write_text(json.dumps(document))
        result = CliRunner().invoke(cli, ["validate", str(path)])
        assert result.exit_code in (0, 2), result.output
        assert "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_index())
def test_pydantic_and_the_published_schema_agree(document: Any) -> None:
    """validate trusts pydantic's verdict on the structure and asks jsonschema only to
    explain a rejection; so the two must accept exactly the same documents."""
    from jsonschema import Draft202012Validator
    from pydantic import ValidationError

    from zoo_agent.index.model import Index
    from zoo_agent.index.schema import index_schema

    schema_ok = Draft202012Validator(index_schema()).is_valid(document)
    try:
        Index.model_validate(document, strict=True)
        model_ok = True
    except ValidationError:
        model_ok = False
    assert schema_ok == model_ok, document
