"""The index as a model registry (issue #35): typed provenance, model tags, aliases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from click.testing import CliRunner

from tests.support.index import write_index
from zoo_agent.cli.main import cli
from zoo_agent.index.fmt import canonical_text
from zoo_agent.index.load import check_document

TYPED: dict[str, Any] = {
    "dataset": {"id": "org/reviews", "revision": "v3", "url": "https://example.org/reviews"},
    "training": {"repository": "https://git.example.org/train", "commit": "0123456789abcdef0123456789abcdef01234567",
                 "command": "python train.py --lr 3e-4"},
    "run": {"id": "run-42", "metrics": {"loss": 2.143, "steps": 1000, "accuracy": 0.5}},
    "reproducibility": {"seed": 7, "environment": {"torch": "2.4.0", "image": "sha256:abc"}},
    "created_by": "ci/train-job",
    "created_at": "2026-01-31T12:00:00Z",
}  # fmt: skip


def _problems(doc: dict[str, Any]) -> list[str]:
    return [f"{p.pointer}: {p.message}" for p in check_document(doc)[1]]


def test_typed_provenance_validates_with_numeric_metrics(index_doc: dict[str, Any]) -> None:
    index_doc["models"]["qwen"]["provenance"] = TYPED
    index_doc["loras"]["review"]["provenance"] = {"run": {"metrics": {"loss": 1}}}
    idx, problems = check_document(index_doc)
    assert problems == [] and idx is not None
    assert idx.models["qwen"].provenance.run is not None and idx.models["qwen"].provenance.run.metrics["loss"] == 2.143
    assert idx.models["qwen"].metadata()["provenance"] == TYPED  # 1000 stays an integer on its way to the manifest


def test_string_only_provenance_keeps_validating_beside_typed_parts(index_doc: dict[str, Any]) -> None:
    """What indexes wrote before #35 (a flat map of strings) is still valid, unchanged, and mixes with typed parts."""
    index_doc["models"]["qwen"]["provenance"] = {"base": "Qwen/Qwen2.5-0.5B", "pipeline": "in-house"}
    index_doc["loras"]["review"]["provenance"] = {"pipeline": "in-house", "run": {"id": "r1", "metrics": {"f1": 0.9}}}
    idx, problems = check_document(index_doc)
    assert problems == [] and idx is not None
    assert idx.models["qwen"].metadata()["provenance"] == {"base": "Qwen/Qwen2.5-0.5B", "pipeline": "in-house"}


@pytest.mark.parametrize(("provenance", "line"), [
    ({"run": {"metrics": {"loss": "low"}}}, "/models/qwen/provenance/run/metrics/loss: expected number, got string"),
    ({"run": {"metrics": {"loss": True}}}, "/models/qwen/provenance/run/metrics/loss: expected number, got boolean"),
    ({"run": "run-42"}, "/models/qwen/provenance/run: expected object, got string"),
    ({"notes": {"a": "b"}}, "/models/qwen/provenance/notes: expected string, got object"),
    ({"pipeline": 3}, "/models/qwen/provenance/pipeline: expected string, got integer"),
    ({"dataset": {"revision": "v1"}}, "/models/qwen/provenance/dataset: missing required field 'id'"),
    ({"dataset": {"id": "d", "licence": "x"}}, "/models/qwen/provenance/dataset/licence: unknown field"),
    ({"training": {"repository": "r", "commit": "main"}}, "/models/qwen/provenance/training/commit: expected a commit id"),
    ({"reproducibility": {"seed": -1}}, "/models/qwen/provenance/reproducibility/seed: must be >= 0"),
    ({"created_at": "last week"}, "/models/qwen/provenance/created_at: expected an ISO 8601 date"),
    ({"created-by": "me"}, "/models/qwen/provenance/created-by: is not a provenance part; did you mean 'created_by'?"),
    ("a string", "/models/qwen/provenance: expected object, got string"),
])  # fmt: skip
def test_a_wrong_type_names_the_field_never_an_internal_class(index_doc: dict[str, Any], provenance: Any, line: str, tmp_path: Path) -> None:
    index_doc["models"]["qwen"]["provenance"] = provenance
    assert any(p.startswith(line) for p in _problems(index_doc)), _problems(index_doc)
    result = CliRunner().invoke(cli, ["validate", str(write_index(tmp_path / "index.json", index_doc))])
    assert result.exit_code == 2 and "_Object" not in result.output and "Traceback" not in result.output
    assert f"{tmp_path / 'index.json'}: {line}" in result.stderr


@pytest.mark.parametrize(("tags", "line"), [
    (["Code"], "/models/qwen/tags/0: expected a tag"),
    (["code review"], "/models/qwen/tags/0: expected a tag"),
    (["code-", "x"], "/models/qwen/tags/0: expected a tag"),
    (["code", "chat", "code"], "/models/qwen/tags/2: lists tag 'code' again (already /models/qwen/tags/0)"),
    ("code", "/models/qwen/tags: expected array, got string"),
])  # fmt: skip
def test_model_tags_are_checked_as_adapter_tags_are(index_doc: dict[str, Any], tags: Any, line: str) -> None:
    index_doc["models"]["qwen"]["tags"] = tags
    assert any(p.startswith(line) for p in _problems(index_doc)), _problems(index_doc)
    index_doc["models"]["qwen"]["tags"] = ["code-review", "chat", "qwen2"]
    index_doc["loras"]["review"]["tags"] = ["Code"]
    assert _problems(index_doc) == ["/loras/review/tags/0: expected a tag: lowercase letters and digits, words joined by '-' (e.g. 'code-review'), got \"Code\""]


def test_fmt_orders_provenance_as_the_model_declares_it(index_doc: dict[str, Any]) -> None:
    index_doc["models"]["qwen"]["provenance"] = {"zeta": "free", "created_at": "2026-01-31", "run": {"metrics": {"b": 1, "a": 2}, "id": "r"},
                                                 "dataset": {"url": "https://x.org", "id": "d"}}  # fmt: skip
    text = canonical_text(index_doc)
    prov = text[text.index('"provenance"'):]
    tokens = ('"dataset"', '"id": "d"', '"url"', '"run"', '"id": "r"', '"metrics"', '"a"', '"b"', '"created_at"', '"zeta"')
    order = [prov.index(token) for token in tokens]
    assert order == sorted(order)


_values = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
_parts = st.sampled_from(["dataset", "training", "run", "reproducibility", "created_by", "created_at", "id", "url", "revision",
                          "repository", "commit", "command", "metrics", "seed", "environment", "loss", "notes", "a"])  # fmt: skip
_provenance = st.recursive(_values, lambda inner: st.dictionaries(_parts, inner, max_size=4), max_leaves=10)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_parts, _provenance, max_size=5))
def test_pydantic_and_the_published_schema_agree_on_provenance(provenance: dict[str, Any]) -> None:
    """Typed parts, numbers, and free-form strings: validate trusts pydantic, the schema explains (test_fuzz.py's rule)."""
    from jsonschema import Draft202012Validator
    from pydantic import ValidationError

    from tests.support.index import VALID_INDEX
    from zoo_agent.index.model import Index
    from zoo_agent.index.schema import index_schema

    document = {**VALID_INDEX, "models": {**VALID_INDEX["models"], "qwen": {**VALID_INDEX["models"]["qwen"], "provenance": provenance}}}
    schema_ok = Draft202012Validator(index_schema()).is_valid(document)
    try:
        Index.model_validate(document, strict=True)
        model_ok = True
    except ValidationError:
        model_ok = False
    assert schema_ok == model_ok, provenance


@pytest.mark.parametrize(("aliases", "line"), [
    (["qwen"], "/models/qwen/aliases/0: alias 'qwen' of model 'qwen' is its own id"),
    (["llama"], "/models/qwen/aliases/0: alias 'llama' of model 'qwen' is also the id of model 'llama'"),
    (["review"], "/models/qwen/aliases/0: alias 'review' of model 'qwen' is also the id of adapter 'review'"),
    (["chat"], "/models/qwen/aliases/0: alias 'chat' of model 'qwen' is also the id of tenant 'chat'"),
    (["q", "q"], "/models/qwen/aliases/1: alias 'q' of model 'qwen' is listed twice (/models/qwen/aliases/0)"),
    (["../x"], "/models/qwen/aliases/0: expected an id"),
    (["Q"], "/models/qwen/aliases/0: expected an id"),
])  # fmt: skip
def test_an_alias_clashing_with_a_name_is_refused_naming_both(index_doc: dict[str, Any], aliases: list[str], line: str) -> None:
    index_doc["models"]["qwen"]["aliases"] = aliases
    assert any(p.startswith(line) for p in _problems(index_doc)), _problems(index_doc)


def test_an_alias_of_two_models_or_a_route_id_is_refused_naming_both(index_doc: dict[str, Any]) -> None:
    index_doc["models"]["qwen"]["aliases"] = ["small", "fast"]
    index_doc["models"]["llama"]["aliases"] = ["small"]
    index_doc["routes"] = {"fast": {"default": "chat"}}
    assert sorted(_problems(index_doc)) == [
        "/models/llama/aliases/0: alias 'small' of model 'llama' is already an alias of model 'qwen' (/models/qwen/aliases/0)",
        "/models/qwen/aliases/1: alias 'fast' of model 'qwen' is also the id of route 'fast'; rename one of them",
    ]


def test_aliases_resolve_in_the_index_and_are_planned_after_the_artifacts(index_doc: dict[str, Any]) -> None:
    from zoo_agent.plan import Action, desired_for_host, plan_aliases

    index_doc["models"]["qwen"]["aliases"] = ["small", "qwen-latest"]
    index_doc["models"]["llama"]["aliases"] = ["mac-model"]
    idx, problems = check_document(index_doc)
    assert problems == [] and idx is not None
    assert (idx.model_named("small"), idx.model_named("qwen"), idx.model_named("nope")) == ("qwen", "qwen", None)
    desired = desired_for_host(idx, "edge-1")
    assert desired.aliases == {"small": "qwen", "qwen-latest": "qwen"}  # llama is not held on edge-1
    present = {"small": "", "qwen-latest": None, "old": "qwen", "gone": ""}
    steps = [(s.action, s.id, s.version, s.describe("plan")) for s in plan_aliases(desired, present)]
    assert steps == [
        (Action.ALIAS, "qwen-latest", "qwen", "cannot link alias qwen-latest to model qwen: models/qwen-latest exists and the zoo did not make it; "
                                              "move it away (or run zoo-agent gc if it is an old model) or rename the alias"),
        (Action.ALIAS, "small", "qwen", "would link alias small to model qwen"),
        (Action.ALIAS, "old", "", "would remove alias old (no longer declared)"),
    ]  # fmt: skip
    assert plan_aliases(desired, {"small": "qwen", "qwen-latest": "qwen"}).steps == ()
