"""Update pull requests and the pin check (issue #35): `zoo-agent registry update-pr` and
`check-pins` against the test hub (tests/support/hubserver.py), with GitHub mocked at its REST API
only (tests/support/githubserver.py), and the two workflows' own scripts run by bash."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support import REPO
from tests.support.githubserver import GitHubServer
from tests.support.githubserver import serve as serve_github
from tests.support.hubserver import HubServer, Repo
from tests.support.hubserver import serve as serve_hub
from tests.support.world import World

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


def test_a_rerun_moves_the_same_branch_and_updates_the_open_pull_request(world: World, hub: HubServer, github: GitHubServer,
                                                                        pinned: str) -> None:  # fmt: skip
    checked_out = world.index.read_text()
    hub.repos["org/tiny"].commit(V2)
    assert world.raw("registry", "update-pr", "--id", "tiny").exit_code == 0
    first_head = github.state.refs["ci/model-update-tiny"]
    world.index.write_text(checked_out)  # the next run starts from a fresh checkout of main
    third = hub.repos["org/tiny"].commit({**V2, "model.safetensors": os.urandom(60_000)})
    github.calls.clear()
    result = world.raw("registry", "update-pr", "--id", "tiny", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["pull_request"] == {"number": 1, "url": "https://github.com/acme/zoo/pull/1", "created": False}
    assert answer["branch"] == "ci/model-update-tiny" and answer["title"] == "Add model artifact: tiny"
    assert len(github.state.pulls) == 1 and f"`hf:org/tiny@{third}`" in github.state.pulls[0]["body"]
    new_head = github.state.refs["ci/model-update-tiny"]
    assert new_head != first_head and github.state.commits[new_head]["parents"] == [BASE_SHA]  # never stacked on the old run
    patched = {(c.method, c.path.split("?")[0]) for c in github.calls if c.method == "PATCH"}
    assert patched == {("PATCH", "/repos/acme/zoo/git/refs/heads/ci/model-update-tiny"), ("PATCH", "/repos/acme/zoo/pulls/1")}
    assert next(c.body for c in github.calls if "git/refs/heads" in c.path) == {"sha": new_head, "force": True}


def test_nothing_new_opens_nothing(world: World, hub: HubServer, github: GitHubServer, pinned: str) -> None:
    before = world.index.read_bytes()
    result = world.raw("registry", "update-pr", "--id", "tiny")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("tiny: the index already pins these bytes; no pull request\n")
    assert world.index.read_bytes() == before and github.calls == []


def test_github_settings_are_checked_before_the_index_changes(world: World, hub: HubServer, github: GitHubServer, pinned: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    hub.repos["org/tiny"].commit(V2)
    before = world.index.read_bytes()
    monkeypatch.delenv("GITHUB_TOKEN")
    result = world.raw("registry", "update-pr", "--id", "tiny")
    assert result.exit_code == 2 and result.stderr == "GITHUB_TOKEN: not set; the workflow passes secrets.GITHUB_TOKEN (or use --dry-run)\n"
    monkeypatch.setenv("GITHUB_TOKEN", "x")
    monkeypatch.setenv("GITHUB_REPOSITORY", "acme/zoo/../../other")
    result = world.raw("registry", "update-pr", "--id", "tiny")
    assert result.exit_code == 2 and "GITHUB_REPOSITORY: expected OWNER/NAME" in result.stderr
    result = world.raw("registry", "update-pr", "--id", "no-such-model", "--dry-run")
    assert result.exit_code == 2 and "no model or lora 'no-such-model' to update" in result.stderr
    result = world.raw("registry", "update-pr", "--id", "tiny", "--dry-run", "--revision", "main", "--source", "hf:org/tiny")
    assert result.exit_code == 2 and result.stderr.startswith("--revision and --source: give one")
    monkeypatch.setenv("GITHUB_REPOSITORY", "acme/zoo")
    monkeypatch.setenv("GITHUB_SHA", "main")
    result = world.raw("registry", "update-pr", "--id", "tiny")
    assert result.exit_code == 2 and result.stderr == "--base-sha: expected the 40-hex commit checked out ($GITHUB_SHA), got 'main'\n"
    monkeypatch.setenv("GITHUB_SHA", BASE_SHA)
    result = world.raw("registry", "update-pr", "--id", "tiny", "--repo-root", str(world.tmp / "elsewhere"))
    assert result.exit_code == 2 and "index.json: is outside the repository at" in result.stderr
    assert world.index.read_bytes() == before and github.calls == []


def test_the_token_never_follows_a_redirect_nor_shows_in_a_message(world: World, hub: HubServer, github: GitHubServer,
                                                                   pinned: str) -> None:  # fmt: skip
    hub.repos["org/tiny"].commit(V2)
    before = world.index.read_bytes()
    with serve_github() as elsewhere:
        github.redirect_to = elsewhere.url
        result = world.raw("registry", "update-pr", "--id", "tiny")
        assert result.exit_code == 1 and "HTTP 307" in result.stderr, result.output
        assert elsewhere.calls == []
    assert world.index.read_bytes() == before  # no pull request: the index as it was
    github.redirect_to = None
    github.token = "ghs_" + "other" * 7  # the workflow's token is refused: one line, no traceback, no token
    result = world.raw("registry", "update-pr", "--id", "tiny")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == f"GitHub API GET /repos/acme/zoo/git/commits/{BASE_SHA}: HTTP 401: Bad credentials"
    assert os.environ["GITHUB_TOKEN"] not in result.output


def test_dry_run_prints_the_pull_request_and_asks_github_nothing(world: World, hub: HubServer, github: GitHubServer,
                                                                 pinned: str) -> None:  # fmt: skip
    second = hub.repos["org/tiny"].commit(V2, branch="run-7")
    result = world.raw("registry", "update-pr", "--id", "tiny", "--dry-run", "--revision", "run-7")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("branch: ci/model-update-tiny\ntitle: Add model artifact: tiny\n\nPins a new version of model `tiny`")
    assert github.calls == [] and json.loads(world.index.read_text())["models"]["tiny"]["source"]["revision"] == second


def _check_pins(world: World, base: Path | None) -> subprocess.CompletedProcess[str]:
    command = [AGENT, "registry", "check-pins", *(["--base", str(base)] if base else []), str(world.index)]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, env={**os.environ})


def test_check_pins_asks_the_hub_about_new_pins_only_and_downloads_nothing(world: World, hub: HubServer, pinned: str) -> None:
    base = world.tmp / "base.json"
    base.write_text(world.index.read_text())
    world.artifact("local", "1", {"weights.bin.safetensors": b"w" * 10})  # a file source: nothing to ask
    document = json.loads(world.index.read_text())
    document["models"]["tiny"] = json.loads(base.read_text())["models"]["tiny"]
    world.index.write_text(json.dumps(document))
    hub.log.clear()
    result = _check_pins(world, base)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "models/local: 1 new pin from a file source: no hub to ask (apply checks the bytes)\n"
    assert hub.log == []  # tiny is as the base pins it: not asked

    second = hub.repos["org/tiny"].commit(V2)
    files = {f: {"path": f, "sha256": sha(d), "size": len(d)} for f, d in V2.items()}
    files["model.safetensors"]["sha256"] = sha(V1["model.safetensors"])  # the old LFS file's digest under the new commit
    files["tokenizer.json"]["size"] += 1  # a small file's size off by one
    document["models"]["tiny"].update(version="2", source={"type": "hf", "repo": "org/tiny", "revision": second}, files=list(files.values()))
    world.index.write_text(json.dumps(document))
    hub.log.clear()
    result = _check_pins(world, base)
    assert result.returncode == 1
    where = f"models/tiny hf:org/tiny@{second[:12]}"
    assert result.stderr.splitlines() == [
        f"{where} model.safetensors: pinned sha256 {sha(V1['model.safetensors'])}, the hub's LFS metadata says {sha(V2['model.safetensors'])}",
        f"{where} tokenizer.json: pinned size 201, the hub's git blob is 200 bytes (not an LFS file)",
        "zoo-agent: " * 0 + f"{world.index}: 2 of 5 new pins disagree with the hub",
    ]  # fmt: skip
    assert f"{where} config.json: not an LFS file: the size matches" in result.stdout
    assert {(h.method, h.path) for h in hub.log} == {("POST", f"/api/models/org/tiny/paths-info/{second}")}  # one request, no bytes

    without_base = _check_pins(world, None)  # no base: every pin is new, tiny's and local's
    assert without_base.returncode == 1 and "2 of 5 new pins" in without_base.stderr


def _step(workflow: str, job: str, name: str) -> str:
    steps = yaml.safe_load((REPO / ".github/workflows" / workflow).read_text())["jobs"][job]["steps"]
    return next(s["run"] for s in steps if s.get("name") == name)


def _bash(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A run: step as Actions runs it (bash --noprofile --norc -eo pipefail), `zoo-agent` being this checkout's."""
    path = f"{Path(AGENT).parent}{os.pathsep}{os.environ['PATH']}"
    full = {**os.environ, "PATH": path, "RUNNER_TEMP": str(cwd.parent), **env}
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], check=False, cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_the_model_update_workflow_script_opens_the_pull_request(world: World, hub: HubServer, github: GitHubServer,
                                                                  pinned: str) -> None:  # fmt: skip
    script = _step("model-update.yml", "update", "Pin, validate, check against the hub, open the pull request")
    second = hub.repos["org/tiny"].commit({**V2, "README.md": b"# tiny"}, branch="run-7")
    (world.tmp / "aaa.md").write_text("a glob the shell would expand")
    metrics = json.dumps({"loss": 1.75}, indent=2)  # as toJSON(github.event.client_payload.metrics) writes it
    provenance = {"run": {"id": "run-7", "metrics": {"eval_loss": 1.9}}, "training": {"repository": "https://example.org/t"}}
    env = {"MODEL_ID": "tiny", "REVISION": "run-7", "ZOO_EXCLUDE": "*.md tokenizer.json", "METRICS": metrics,
           "PROVENANCE": json.dumps(provenance, indent=2)}  # fmt: skip
    proc = _bash(script, world.tmp, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "opened pull request #1 from ci/model-update-tiny: https://github.com/acme/zoo/pull/1\n"
    assert json.loads(world.index.read_text())["models"]["tiny"]["provenance"] == provenance  # through `add --provenance`
    body = github.state.pulls[0]["body"]
    assert f"`hf:org/tiny@{second}`" in body and "| `loss` | 1.75 |" in body and "| `eval_loss` | 1.9 |" in body
    assert "No longer pinned: `tokenizer.json`." in body and "README.md" not in body  # both globs reached `add`, unexpanded


def test_the_model_update_workflow_script_takes_hostile_inputs_as_data(world: World, hub: HubServer, github: GitHubServer,
                                                                       pinned: str) -> None:  # fmt: skip
    script = _step("model-update.yml", "update", "Pin, validate, check against the hub, open the pull request")
    before = world.index.read_bytes()
    hub.repos["org/tiny"].commit(V2)  # something to update: each input is refused for itself
    hostile = [
        {"MODEL_ID": 'tiny"; touch pwned; echo "', "REVISION": "", "METRICS": "null"},
        {"MODEL_ID": "tiny", "REVISION": "$(touch pwned)", "METRICS": "null"},
        {"MODEL_ID": "tiny", "REVISION": "", "METRICS": '{"loss": "$(touch pwned)"}'},
        {"MODEL_ID": "tiny", "REVISION": "", "METRICS": "null", "PROVENANCE": '{"run": {"metrics": {"loss": "$(touch pwned)"}}}'},
        {"MODEL_ID": "--dry-run", "REVISION": "", "METRICS": "null"},
    ]
    for env in hostile:
        proc = _bash(script, world.tmp, env)
        assert proc.returncode in (1, 2) and len(proc.stderr.splitlines()) == 1, (env, proc.stderr)  # refused, one line
        assert not (world.tmp / "pwned").exists()
    assert world.index.read_bytes() == before and github.calls == []


def test_the_index_workflow_script_checks_the_pull_requests_new_pins(world: World, hub: HubServer, pinned: str) -> None:
    script = _step("index.yml", "pins", "New pins against the hub's LFS metadata")
    repo = world.tmp / "checkout"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "index.json").write_text(world.index.read_text())
    subprocess.run([*git, "add", "index.json"], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)
    second = hub.repos["org/tiny"].commit(V2)
    document = json.loads(world.index.read_text())
    document["models"]["tiny"].update(version="2", source={"type": "hf", "repo": "org/tiny", "revision": second},
                                      files=[{"path": f, "sha256": sha(d), "size": len(d)} for f, d in sorted(V2.items())])  # fmt: skip
    (repo / "index.json").write_text(json.dumps(document))
    subprocess.run([*git, "commit", "-qam", "the pull request"], check=True)
    good = _bash(script, repo, {})
    assert good.returncode == 0, good.stderr
    assert f"models/tiny hf:org/tiny@{second[:12]} model.safetensors: sha256 and size match the hub's LFS metadata" in good.stdout

    document["models"]["tiny"]["files"][2]["sha256"] = sha(b"something else")  # model.safetensors
    (repo / "index.json").write_text(json.dumps(document))
    subprocess.run([*git, "commit", "-q", "--amend", "-am", "the pull request, with a wrong pin"], check=True)
    bad = _bash(script, repo, {})
    assert bad.returncode == 1 and "model.safetensors: pinned sha256 " in bad.stderr and "1 of 4 new pins disagree" in bad.stderr
    assert not [h for h in hub.log if "/resolve/" in h.path and h.method == "GET" and "model.safetensors" in h.path]
