"""Update pull requests (issue #35), the pure parts: the pins diff, the hub comparison, the
pull request's branch, title and body (hostile strings kept inert), and the workflows'
safety properties (triggers, least privilege, pinned actions, no ${{ }} in a script)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import REPO
from zoo_agent.errors import UsageError
from zoo_agent.registry import pull
from zoo_agent.registry.hubcheck import Finding, HubFile, compare
from zoo_agent.registry.pins import EntryChange, FilePin, changes

REV1, REV2 = "1" * 40, "2" * 40


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry(version: str, revision: str, files: dict[str, bytes], **extra: Any) -> dict[str, Any]:
    return {"version": version, "source": {"type": "hf", "repo": "org/m", "revision": revision}, "license": "MIT",
            "files": [{"path": p, "sha256": sha(d), "size": len(d)} for p, d in files.items()], **extra}  # fmt: skip


def test_changes_name_each_file_added_changed_same_and_removed() -> None:
    base = {"models": {"m": entry("1", REV1, {"a": b"a", "b": b"b", "gone": b"g"}), "same": entry("1", REV1, {"x": b"x"})}}
    head = {"models": {"m": entry("2", REV2, {"a": b"a", "b": b"B!", "new": b"n"}), "same": entry("1", REV1, {"x": b"x"})}}
    (change,) = changes(base, head)
    assert (change.kind, change.id, change.removed) == ("models", "m", ("gone",))
    assert [(f.path, f.status, f.size) for f in change.files] == [("a", "same", 1), ("b", "changed", 2), ("new", "added", 1)]
    assert change.moved and [f.path for f in change.new_pins()] == ["a", "b", "new"]  # a new commit: every claim is new

    head["models"]["m"]["source"]["revision"] = REV1  # same commit, other files: only the changed claims are new
    (change,) = changes(base, head)
    assert not change.moved and [f.path for f in change.new_pins()] == ["b", "new"]


def test_changes_read_a_malformed_base_as_pinning_nothing() -> None:
    head = {"models": {"m": entry("1", REV1, {"a": b"a"})}, "loras": {"l": entry("1", REV1, {"w": b"w"})}}
    for base in (None, [], {"models": []}, {"models": {"m": "x"}}, {"models": {"m": {"files": [1, {"path": "a", "size": True}]}}}):
        found = changes(base, head)
        assert [(c.kind, c.id) for c in found] == [("models", "m"), ("loras", "l")]
        assert all(f.status == "added" for c in found for f in c.files)
    assert changes(head, head) == []


@pytest.mark.parametrize(("hub", "checked", "message"), [
    (HubFile(5, sha(b"12345"), 5), "lfs", "sha256 and size match the hub's LFS metadata"),
    (HubFile(5, sha(b"other"), 5), "failed", f"pinned sha256 {sha(b'12345')}, the hub's LFS metadata says {sha(b'other')}"),
    (HubFile(6, sha(b"12345"), 6), "failed", "pinned size 5, the hub's LFS metadata says 6"),
    (HubFile(5), "size", "not an LFS file: the size matches; its sha256 needs the bytes (apply checks it)"),
    (HubFile(4), "failed", "pinned size 5, the hub's git blob is 4 bytes (not an LFS file)"),
    (None, "failed", "no such file in the repository at that commit"),
])  # fmt: skip
def test_compare_a_pin_with_the_hubs_answer(hub: HubFile | None, checked: str, message: str) -> None:
    assert compare(FilePin("w.safetensors", sha(b"12345"), 5, "added"), hub) == (checked, message)


def test_finding_lines_stay_one_line() -> None:
    assert Finding("models/m hf:org/m@111 a\nb", "failed", "x").line() == "models/m hf:org/m@111 a\\nb: x"


@pytest.mark.parametrize("aid", ["a..b", "m.", "m.lock", "M", "-m", "m/../../x", "m n", "m" * 65, ""])
def test_branch_names_refuse_what_git_or_the_index_would(aid: str) -> None:
    with pytest.raises(UsageError, match="not an index id that can name a branch"):
        pull.branch_name(aid)


def test_branch_and_title() -> None:
    assert pull.branch_name("qwen2.5-0.5b_instruct") == "ci/model-update-qwen2.5-0.5b_instruct"
    assert pull.title("qwen2.5-0.5b_instruct") == "Add model artifact: qwen2.5-0.5b_instruct"


def test_metrics_are_read_from_typed_provenance_only_as_finite_numbers() -> None:
    typed = {"provenance": {"run": {"id": "r7", "metrics": {"loss": 2.143, "steps": 10, "ok": True, "nan": float("nan"), "s": "1"}}}}
    assert pull.metrics_of(typed) == {"loss": 2.143, "steps": 10}
    for shapeless in (None, {}, {"provenance": {"metrics": "loss=2"}}, {"provenance": "x"}, {"provenance": {"run": {"metrics": [1]}}}):
        assert pull.metrics_of(shapeless) == {}


HOSTILE = "x|y`z\n## @octocat <img src=x> ``"


def test_strings_from_the_index_or_hub_stay_inside_their_cell() -> None:
    span = pull.code(HOSTILE)
    assert "\n" not in span and "|" not in span.replace("\\|", "")
    fence = re.match(r"`+", span)
    assert fence is not None and len(fence.group()) == 3 and span.endswith("```")  # longer than any backtick run inside
    before = {"version": "1", "source": {"type": "file", "path": "out"}, "files": []}
    after = {**before, "version": "2", "provenance": {"run": {"metrics": {HOSTILE: 1.0}}}}
    change = EntryChange("models", "m", before, after, (FilePin(HOSTILE, sha(b"x"), 1, "added"),), (HOSTILE,))
    body = pull.body(change, pull.metrics_of(after), [])
    assert not [line for line in body.splitlines() if line.startswith("#") and "octocat" in line]  # no heading injected
    spans = re.compile(r"(?<!`)(`+)(?!`).*?(?<!`)\1(?!`)")  # CommonMark: a closing run of exactly the opening's length
    assert "@octocat" not in spans.sub("", body)  # only ever inside code spans: no mention, no notification
    tables = re.findall(r"(?:^\|.*\n)+", body, re.MULTILINE)
    assert len(tables) == 3
    for table in tables:  # every row has as many cells as its table's header: no pipe escaped its cell
        widths = {len(re.split(r"(?<!\\)\|", line)) for line in table.splitlines()}
        assert len(widths) == 1, table


def test_the_body_is_cut_to_githubs_limit_with_a_count() -> None:
    files = tuple(FilePin(f"shard-{i:05}.safetensors", sha(str(i).encode()), 1 << 20, "added") for i in range(5000))
    change = EntryChange("models", "m", None, {"version": "1", "source": {"type": "hf", "repo": "o/m", "revision": REV1}}, files, ())
    body = pull.body(change, {f"m{i}": float(i) for i in range(5000)}, [])
    assert len(body) <= pull.BODY_LIMIT + 100
    assert f"… and {5000 - pull.FILES_SHOWN} more files: see the diff." in body


# The workflows -------------------------------------------------------------------------

WORKFLOWS = sorted((REPO / ".github/workflows").glob("*.yml"))
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@([0-9a-f]{40}|v\d+)$")


def _load(name: str) -> dict[Any, Any]:
    document = yaml.safe_load((REPO / ".github/workflows" / name).read_text())
    document["on"] = document.pop(True, document.get("on"))  # YAML 1.1 reads the key `on` as true
    return document


def test_model_update_runs_by_hand_and_from_a_training_job_with_least_privilege() -> None:
    workflow = _load("model-update.yml")
    assert workflow["on"]["workflow_dispatch"]["inputs"]["model"]["required"] is True
    assert workflow["on"]["repository_dispatch"] == {"types": ["model-trained"]}
    assert workflow["permissions"] == {}  # nothing by default; the one job asks for what it uses
    (job,) = workflow["jobs"].values()
    assert job["permissions"] == {"contents": "write", "pull-requests": "write"}
    checkout = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["persist-credentials"] is False  # the token is not left in .git/config for later steps
    step = next(s for s in job["steps"] if "update-pr" in s.get("run", ""))
    assert step["env"]["GITHUB_TOKEN"] == "${{ secrets.GITHUB_TOKEN }}"
    assert {"MODEL_ID", "REVISION", "ZOO_EXCLUDE", "METRICS"} <= set(step["env"])


def test_the_index_workflow_checks_pins_on_pull_requests_read_only() -> None:
    workflow = _load("index.yml")
    assert workflow["permissions"] == {"contents": "read"}
    pins = workflow["jobs"]["pins"]
    assert pins["if"] == "github.event_name == 'pull_request'"
    assert any("registry check-pins --base" in s.get("run", "") for s in pins["steps"])
    assert next(s for s in pins["steps"] if "uses" in s)["with"]["fetch-depth"] == 2  # HEAD^1: the base branch


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflows_pin_actions_and_keep_expressions_out_of_scripts(path: Path) -> None:
    workflow = _load(path.name)
    for name, job in workflow["jobs"].items():
        for step in job["steps"]:
            if "uses" in step:
                assert PINNED.match(step["uses"]), f"{path.name}: {name}: {step['uses']}: pin a commit (or at least a major version)"
            assert "${{" not in step.get("run", ""), f"{path.name}: {name}: pass values to scripts through env:, never ${{{{ }}}}"
    if path.name in ("model-update.yml", "index.yml"):  # the workflows of this issue: commits, not tags
        uses = [s["uses"] for job in workflow["jobs"].values() for s in job["steps"] if "uses" in s]
        assert uses and all(re.search(r"@[0-9a-f]{40}$", u) for u in uses)


def test_a_metadata_only_change_does_not_claim_a_new_version() -> None:
    """`add --update` at an unchanged commit writes provenance and keeps the version: the body says so."""
    before = entry("1", REV1, {"w.safetensors": b"w"})
    after = {**before, "provenance": {"run": {"metrics": {"loss": 1.5}}}}
    change = EntryChange("models", "m", before, after, (FilePin("w.safetensors", sha(b"w"), 1, "same"),), ())
    assert pull.body(change, pull.metrics_of(after), []).startswith("Updates the metadata (the pinned bytes are unchanged) of model `m`")
    moved = EntryChange("models", "m", before, {**after, "version": "2"}, change.files, ())
    assert pull.body(moved, {}, []).startswith("Pins a new version of model `m`")
