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

from tests.support import REPO
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
    """index.json pins the tiny model, its GGUF and the adapter that `zoo-agent demo` builds (byte for byte)."""
    pytest.importorskip("peft", reason="building the demo model needs the resident extra (pip install -e .[resident])")
    from zoo_agent.cli.demo import build_sources
    from zoo_agent.index.load import load_index

    result = CliRunner().invoke(cli, ["validate", str(REPO / "index.json")])
    assert result.exit_code == 0, result.output
    shutil.copy(REPO / "index.json", tmp_path / "index.json")
    idx = load_index(tmp_path / "index.json", "index.json")
    assert build_sources(idx, tmp_path, "demo") == ["demo", "demo-terse"]  # raises, naming the files, if a pin differs
    assert build_sources(idx, tmp_path, "demo-llama") == ["demo-gguf"]  # the host with a llama.cpp tenant: the rest is built
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


FLEET_EXAMPLE = REPO / "examples" / "fleet" / "index.json"


def fleet_placeholder(repo: str, path: str) -> bytes:
    """The bytes examples/fleet/index.json pins for *path* of hf *repo*: a placeholder of the
    right shape, so the example validates and can be served by a stand-in mirror (issue #22)."""
    return f"placeholder for {repo}: {path}\n".encode()


def fleet_revision(repo: str) -> str:
    return hashlib.sha1(f"placeholder {repo}".encode()).hexdigest()


def test_fleet_example_is_valid() -> None:
    result = CliRunner().invoke(cli, ["validate", str(FLEET_EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert "3 models, 0 loras, 3 tenants, 3 hosts" in result.output
    result = CliRunner().invoke(cli, ["fmt", "--check", str(FLEET_EXAMPLE)])  # as .github/workflows/index.yml checks
    assert result.exit_code == 0, result.output


def test_fleet_example_pins_its_placeholders() -> None:
    """The README tells how to replace them (`zoo-agent add` against the mirror); until then they are these."""
    for model in json.loads(FLEET_EXAMPLE.read_text())["models"].values():
        repo = model["source"]["repo"]
        assert model["source"] == {"type": "hf", "repo": repo, "revision": fleet_revision(repo)}
        for file in model["files"]:
            data = fleet_placeholder(repo, file["path"])
            assert (file["sha256"], file["size"]) == (hashlib.sha256(data).hexdigest(), len(data))


def test_fleet_example_hosts_share_one_tenant_and_declare_their_endpoints() -> None:
    document = json.loads(FLEET_EXAMPLE.read_text())
    hosts = document["hosts"]
    assert set(hosts) == {"thor", "legion", "sprout"}  # examples/fleet/flake.nix's hosts, and the hosts/*.nix files
    assert {h: v["endpoint"] for h, v in hosts.items()} == {h: f"http://{h}.lan:8000" for h in hosts}  # resident.listen's port
    assert all("chat" in v["tenants"] for v in hosts.values())
    overflowing = [t for t, v in document["tenants"].items() if v.get("overflow") == "peers"]
    assert overflowing and all(any(t in v.get("accept_from_peers", []) for v in hosts.values()) for t in overflowing)


def test_fleet_example_each_host_fetches_its_slice_once_from_the_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every host applies the one index from one mirror: each gets its tenants' models, and
    the mirror serves each host exactly those bytes (bench/fleet.py measures the same at scale)."""
    from tests.support.hubserver import HubServer, Repo, serve

    document = json.loads(FLEET_EXAMPLE.read_text())
    server: HubServer
    with serve() as server:
        for model in document["models"].values():
            repo = model["source"]["repo"]
            server.repos[repo] = Repo(commits={fleet_revision(repo): {f["path"]: fleet_placeholder(repo, f["path"]) for f in model["files"]}})
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        for host, entry in document["hosts"].items():
            server.log.clear()
            result = CliRunner().invoke(cli, ["apply", "--root", str(tmp_path / host), "--index", str(FLEET_EXAMPLE), "--host", host])
            assert result.exit_code == 0, result.output
            models = {document["tenants"][t]["model"] for t in entry["tenants"]}
            assert sorted(p.name for p in (tmp_path / host / "models").iterdir()) == sorted(models)
            files = [f for m in models for f in document["models"][m]["files"]]
            # With a memory_budget, apply reads each model's config.json first, to prove the
            # fit before anything switches (reconcile/footprints.py), then fetches every file.
            files += [f for f in files if f["path"] == "config.json"] if entry.get("memory_budget") else []
            downloads = sorted((h.path.rsplit("/", 1)[1], h.sent) for h in server.log if h.method == "GET" and "/resolve/" in h.path)
            assert downloads == sorted((f["path"], f["size"]) for f in files), host
