"""The checked-in indexes: index.json is valid, examples/fleet.json lists every stub (issue #2)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.conftest import REPO
from zoo_agent.cli.main import cli
from zoo_agent.index.load import check_document

FLEET = REPO / "examples" / "fleet.json"


def _stub_pointers(node: Any, at: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _stub_pointers(v, f"{at}/{k}")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _stub_pointers(v, f"{at}/{i}")]
    return [at] if isinstance(node, str) and node.startswith("TODO-STUB") else []


def test_top_level_index_is_valid_and_its_pins_are_what_the_demo_builds(tmp_path: Path) -> None:
    """index.json pins the tiny model and adapter that `zoo-agent demo` builds (byte for byte)."""
    pytest.importorskip("peft", reason="building the demo model needs the resident extra (pip install -e .[resident])")
    from zoo_agent.cli.demo import build_sources
    from zoo_agent.index.load import load_index

    result = CliRunner().invoke(cli, ["validate", str(REPO / "index.json")])
    assert result.exit_code == 0, result.output
    shutil.copy(REPO / "index.json", tmp_path / "index.json")
    idx = load_index(tmp_path / "index.json", "index.json")
    assert build_sources(idx, tmp_path, "demo") == ["demo", "demo-terse"]  # raises, naming the files, if a pin differs
    for kind in ("models", "loras"):
        for entry in json.loads((REPO / "index.json").read_text())[kind].values():
            for file in entry["files"]:
                data = (tmp_path / entry["source"]["path"] / file["path"]).read_bytes()
                assert (len(data), hashlib.sha256(data).hexdigest()) == (file["size"], file["sha256"])


def test_fleet_is_refused_naming_every_stub() -> None:
    stubs = _stub_pointers(json.loads(FLEET.read_text()))
    assert len(stubs) > 50
    result = CliRunner().invoke(cli, ["validate", "--json", str(FLEET)])
    assert result.exit_code == 2
    errors = json.loads(result.stdout)["errors"]
    assert sorted(e["pointer"] for e in errors) == sorted(stubs)
    assert all("still holds a placeholder" in e["message"] for e in errors)


def test_fleet_is_otherwise_sound() -> None:
    """Fill every stub with a plausible value: the rest of the example must be valid."""
    counter = iter(range(10**6))

    def fill(match: re.Match[str]) -> str:
        n = next(counter)
        kind = match.group(1)
        if kind == "size":
            return str(1000 + n)
        digest = hashlib.sha256(str(n).encode()).hexdigest()
        return {"revision": f'"{digest[:40]}"', "digest": f'"sha256:{digest}"'}.get(kind, f'"{digest}"')

    filled = re.sub(r'"TODO-STUB-(\w+)"', fill, FLEET.read_text())
    _, problems = check_document(json.loads(filled))
    assert problems == []


def test_fleet_describes_four_different_hosts() -> None:
    document = json.loads(FLEET.read_text())
    assert len(document["hosts"]) == 4
    backends = {document["tenants"][h["resident"]].get("backend", "transformers") for h in document["hosts"].values()}
    assert backends == {"transformers", "ollama"}
    assert any(document["tenants"][h["resident"]].get("loras") for h in document["hosts"].values())
    assert any(len(h.get("available", [])) >= 2 for h in document["hosts"].values())


def test_validate_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "fleet.json"
    target.write_bytes(FLEET.read_bytes())
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*")}
    CliRunner().invoke(cli, ["validate", str(target)])
    CliRunner().invoke(cli, ["validate", "--json", str(target)])
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*")} == before
