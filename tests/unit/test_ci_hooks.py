"""The checked-in workflow and pre-commit hooks run commands that exist and pass (issue #4)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from tests.support import REPO

AGENT = str(Path(sys.executable).with_name("zoo-agent"))


def test_workflow_commands_pass_on_the_index() -> None:
    workflow = yaml.safe_load((REPO / ".github/workflows/index.yml").read_text())
    runs = [step["run"] for step in workflow["jobs"]["validate"]["steps"] if "zoo-agent" in step.get("run", "")]
    assert any("validate" in r for r in runs) and any("fmt --check" in r for r in runs)
    for command in runs:
        proc = subprocess.run(command.replace("zoo-agent", shlex.quote(AGENT)), shell=True, cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)


def test_pre_commit_hooks_run_and_reject_a_bad_index(tmp_path: Path) -> None:
    for name in (".pre-commit-hooks.yaml", ".pre-commit-config.yaml"):
        document = yaml.safe_load((REPO / name).read_text())
        hooks = document if isinstance(document, list) else document["repos"][0]["hooks"]
        assert {h["id"] for h in hooks} == {"zoo-agent-validate", "zoo-agent-fmt"}
        for hook in hooks:
            assert re.search(hook["files"], "fleet/index.json") and not re.search(hook["files"], "notes.json")
            entry = [AGENT, *shlex.split(hook["entry"])[1:]]
            assert subprocess.run([*entry, str(REPO / "index.json")], capture_output=True).returncode == 0
            bad = tmp_path / "index.json"
            bad.write_text('{"models": {"x": {}}}')
            assert subprocess.run([*entry, str(bad)], capture_output=True).returncode != 0
