"""Update pull requests and the pin check (issue #35): `zoo-agent registry update-pr` and
`check-pins` against the test hub (tests/hubserver.py), with GitHub mocked at its REST API
only (tests/githubserver.py), and the two workflows' own scripts run by bash."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.githubserver import GitHubServer
from tests.githubserver import serve as serve_github
from tests.hubserver import HubServer, Repo
from tests.hubserver import serve as serve_hub
from tests.integration.conftest import World

AGENT = str(Path(sys.executable).with_name("zoo-agent"))
BASE_SHA = "b" * 40
V1 = {"config.json": b'{"model_type": "llama"}', "model.safetensors": os.urandom(40_000), "tokenizer.json": b"{}" * 100}
V2 = {**V1, "model.safetensors": os.urandom(50_000), "generation_config.json": b'{"do_sample": false}'}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with serve_hub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


@pytest.fixture
def github(monkeypatch: pytest.MonkeyPatch) -> Iterator[GitHubServer]:
    for name in list(os.environ):
        if name.startswith("GITHUB_"):  # a test run inside Actions must not reach the real API
            monkeypatch.delenv(name)
    with serve_github() as server:
        server.commit(BASE_SHA)
        monkeypatch.setenv("GITHUB_API_URL", server.url)
        monkeypatch.setenv("GITHUB_REPOSITORY", server.repository)
        monkeypatch.setenv("GITHUB_TOKEN", server.token)
        monkeypatch.setenv("GITHUB_REF_NAME", "main")
        monkeypatch.setenv("GITHUB_SHA", BASE_SHA)
        yield server


@pytest.fixture
def pinned(world: World, hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """An index whose model 'tiny' is pinned, with `add`, at the hub's first commit; cwd is its repository."""
    first = hub.repos.setdefault("org/tiny", Repo()).commit(V1)
    world.write_index()
    added = world.raw("add", "hf:org/tiny", "--id", "tiny", "--index", str(world.index))
    assert added.exit_code == 0, added.output
    monkeypatch.chdir(world.tmp)
    return first


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_update_pr_opens_the_pull_request_with_the_pins_and_metrics(world: World, hub: HubServer, github: GitHubServer,
                                                                    pinned: str) -> None:  # fmt: skip
    second = hub.repos["org/tiny"].commit(V2)
    metrics = world.tmp / "metrics.json"
    metrics.write_text(json.dumps({"loss": 2.143, "eval/accuracy": 0.71, "steps": 1200}))
    result = world.raw("registry", "update-pr", "--id", "tiny", "--metrics", str(metrics))
    assert result.exit_code == 0, result.output
    assert result.stdout == "opened pull request #1 from ci/model-update-tiny: https://github.com/acme/zoo/pull/1\n"

    entry = json.loads(world.index.read_text())["models"]["tiny"]  # `add --update` ran: the new commit is pinned
    assert entry["source"]["revision"] == second and entry["version"] == second[:12]
    (pr,) = github.state.pulls
    assert pr["title"] == "Add model artifact: tiny"
    assert pr["head"] == {"ref": "ci/model-update-tiny"} and pr["base"] == {"ref": "main"}
    body = pr["body"]
    for path, data in V2.items():  # every file's sha256 and exact size, in its row
        row = next(line for line in body.splitlines() if line.startswith(f"| `{path}` |"))
        assert f"| {len(data)} | `{sha(data)}` |" in row, row
    assert "| `generation_config.json` |" in body and body.count("| changed |") == 1 and body.count("| added |") == 1
    assert f"`{pinned[:12]}` | `{second[:12]}`" in body  # version before -> after
    assert f"`hf:org/tiny@{second}`" in body
    assert "| `loss` | 2.143 |" in body and "| `eval/accuracy` | 0.71 |" in body and "| `steps` | 1200 |" in body
    assert "- 1 LFS file matches the hub's LFS metadata (sha256 and size)" in body  # model.safetensors
    assert "- 3 small files kept in git match by size" in body

    # The commit: the updated index, over the checked-out commit, on the branch.
    branch_head = github.state.refs["ci/model-update-tiny"]
    commit = github.state.commits[branch_head]
    assert commit["parents"] == [BASE_SHA] and commit["message"].startswith("Add model artifact: tiny\n\n")
    assert github.state.trees[commit["tree"]] == {"index.json": world.index.read_text()}
    assert all(c.authorization == f"Bearer {github.token}" for c in github.calls)
    assert [(c.method, c.path.split("?")[0]) for c in github.calls] == [
        ("GET", f"/repos/acme/zoo/git/commits/{BASE_SHA}"), ("POST", "/repos/acme/zoo/git/trees"),
        ("POST", "/repos/acme/zoo/git/commits"), ("GET", "/repos/acme/zoo/git/ref/heads/ci/model-update-tiny"),
        ("POST", "/repos/acme/zoo/git/refs"), ("GET", "/repos/acme/zoo/pulls"), ("POST", "/repos/acme/zoo/pulls"),
    ]  # fmt: skip
    assert not [h for h in hub.log if h.method == "GET" and "model.safetensors" in h.path]  # LFS files: never downloaded
