"""Canonical formatting: stable, idempotent, meaning-preserving (issue #2)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from tests.support import REPO
from zoo_agent.cli.main import cli
from zoo_agent.index.fmt import canonical_text


def _shuffled(node: Any, rng: random.Random) -> Any:
    if isinstance(node, dict):
        items = list(node.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(node, list):
        return [_shuffled(v, rng) for v in node]
    return node


def test_order_is_canonical_whatever_the_input_order(index_doc: dict[str, Any]) -> None:
    rng = random.Random(7)
    index_doc["models"]["qwen"]["files"].reverse()
    texts = {canonical_text(_shuffled(index_doc, rng)) for _ in range(20)}
    assert len(texts) == 1
    (text,) = texts
    document = json.loads(text)
    assert list(document) == ["models", "loras", "tenants", "hosts"]
    assert list(document["models"]) == ["llama", "qwen"]  # ids sorted
    assert list(document["models"]["qwen"]) == ["version", "source", "files", "format", "license"]
    assert list(document["models"]["qwen"]["source"]) == ["type", "repo", "revision"]
    assert [f["path"] for f in document["models"]["qwen"]["files"]] == ["config.json", "model.safetensors"]
    assert text.startswith('{\n  "models": {\n    "llama": {\n      "version"')


def test_fmt_keeps_meaning_and_unknown_keys(index_doc: dict[str, Any]) -> None:
    index_doc["models"]["qwen"]["zzz_unknown"] = 1
    index_doc["models"]["qwen"]["aaa_unknown"] = 2
    document = json.loads(canonical_text(index_doc))
    assert list(document["models"]["qwen"])[-2:] == ["aaa_unknown", "zzz_unknown"]
    for entry in (document, index_doc):
        entry["models"]["qwen"]["files"].sort(key=lambda f: f["path"])
    assert document == index_doc


def test_fmt_check_shows_diff_and_exits_1(tmp_path: Path, index_doc: dict[str, Any]) -> None:
    path = tmp_path / "index.json"
    path.write_text(json.dumps(index_doc))  # one line: not canonical
    before = path.read_bytes()
    result = CliRunner().invoke(cli, ["fmt", "--check", str(path)])
    assert result.exit_code == 1
    assert result.stdout.startswith(f"--- {path}\n+++ {path} (canonical)\n")
    assert result.stderr.strip() == f"{path}: not in canonical form; run: zoo-agent fmt {path}"
    assert path.read_bytes() == before  # --check changes nothing


def test_fmt_rewrites_then_check_passes(tmp_path: Path, index_doc: dict[str, Any]) -> None:
    path = tmp_path / "index.json"
    path.write_text(json.dumps(index_doc))
    path.chmod(0o640)
    assert CliRunner().invoke(cli, ["fmt", str(path)]).exit_code == 0
    assert path.stat().st_mode & 0o777 == 0o640  # mode kept
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]  # no temp file left
    result = CliRunner().invoke(cli, ["fmt", "--check", "--json", str(path)])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"file": str(path), "canonical": True, "changed": False}


def test_fmt_refuses_malformed_json_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "index.json"
    path.write_text('{"models": ')
    result = CliRunner().invoke(cli, ["fmt", str(path)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"{path}: line 1, column 12: ")
    assert path.read_text() == '{"models": '


def test_checked_in_indexes_are_canonical() -> None:
    for name in ("index.json", "examples/fleet.json"):
        result = CliRunner().invoke(cli, ["fmt", "--check", str(REPO / name)])
        assert result.exit_code == 0, result.output
