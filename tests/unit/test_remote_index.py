"""Remote tenants in the index (issue #36): ``backend: "openai"`` with a ``remote`` server, no model,
nothing to fetch or size; every mistake one line naming its field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tests.support.index import VALID_INDEX
from zoo_agent.index.fit import tenant_footprint
from zoo_agent.index.load import check_document
from zoo_agent.plan import desired_for_host

REMOTE: dict[str, Any] = {"backend": "openai", "remote": {"base_url": "https://api.openai.com/v1", "model": "gpt-4o-mini", "key_file": "openai-key"}}


def _doc(**tenant: Any) -> dict[str, Any]:
    doc = copy.deepcopy(VALID_INDEX)
    doc["tenants"]["cloud"] = {**copy.deepcopy(REMOTE), **tenant}
    doc["hosts"]["edge-1"] = {"tenants": ["chat", "cloud"], "available": ["qwen"], "memory_budget": "2G"}
    return doc


def _problems(doc: dict[str, Any]) -> list[str]:
    idx, problems = check_document(doc)
    assert (idx is None) == bool(problems)
    return [f"{p.pointer}: {p.message}" for p in problems]


def test_a_remote_tenant_names_a_server_and_no_model_and_needs_nothing_on_disk() -> None:
    idx, problems = check_document(_doc())
    assert problems == [] and idx is not None
    cloud = idx.tenants["cloud"]
    assert cloud.is_remote and cloud.model == "" and cloud.remote is not None and cloud.remote.max_concurrent == 4
    assert tenant_footprint(idx, "cloud", None).total == 0
    desired = desired_for_host(idx, "edge-1")
    assert {w.id for w in desired.wants} == {"qwen", "review"}  # the local tenant's only


@pytest.mark.parametrize(("url", "said"), [
    ("http://api.example.com/v1", "http:// to this machine only"),
    ("http://10.0.0.5:8000/v1", "http:// to this machine only"),
    ("http://127.0.0.1.evil.example/v1", "http:// to this machine only"),
    ("https://user:pw@api.example.com/v1", "no user, query or fragment"),
    ("https://api.example.com/v1?key=x", "no user, query or fragment"),
    ("ftp://api.example.com/v1", "an https:// URL"),
    ("https://exa mple.com/v1", "an https:// URL"),
    ("https://ex_ample..com/v1", "empty label"),
    ("https://bücher.example/v1", "not ASCII"),
    ("https://api.example.com:0/v1", "port 0"),
    ("https://api.example.com:99999/v1", "is not a URL"),
])  # fmt: skip
def test_a_base_url_is_https_or_http_to_loopback_only(url: str, said: str) -> None:
    doc = _doc()
    doc["tenants"]["cloud"]["remote"]["base_url"] = url
    problems = _problems(doc)
    assert len(problems) == 1 and problems[0].startswith("/tenants/cloud/remote/base_url: ") and said in problems[0], problems


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/v1", "http://localhost:8000/v1", "http://[::1]:9/v1", "https://10.0.0.5/v1",
                                 "https://my-vllm.lan:8443/v1", "https://api.openai.com/v1/"])  # fmt: skip
def test_loopback_http_and_any_https_are_accepted(url: str) -> None:
    doc = _doc()
    doc["tenants"]["cloud"]["remote"]["base_url"] = url
    assert _problems(doc) == []


@pytest.mark.parametrize(("change", "said"), [
    ({"model": "qwen"}, "/tenants/cloud/model: a remote tenant (backend 'openai') serves no model of 'models'"),
    ({"remote": None}, "/tenants/cloud/remote: expected object, got null"),
    ({"loras": ["review"]}, "/tenants/cloud/loras: a remote tenant (backend 'openai') has no adapters here"),
    ({"pinned": True}, "/tenants/cloud/pinned: a remote tenant (backend 'openai') is never paged"),
    ({"fetch": "on-demand"}, "/tenants/cloud/fetch: a remote tenant (backend 'openai') has nothing to fetch"),
    ({"keep_alive": "5min"}, "/tenants/cloud/keep_alive: a remote tenant (backend 'openai') is never paged"),
    ({"kind": "embedding"}, "/tenants/cloud/backend: an embedding tenant is served by the 'transformers' backend"),
    ({"sessions": {"keep": 3}}, "/tenants/cloud/sessions: a remote tenant (backend 'openai') keeps no sessions here"),
    ({"resources": {"max_batch": 4}}, "/tenants/cloud/resources/max_batch: does not apply to a remote tenant"),
    ({"resources": {"memory_max": "1G"}}, "/tenants/cloud/resources/memory_max: does not apply to a remote tenant"),
    ({"remote": {"base_url": "https://x.example/v1"}}, "/tenants/cloud/remote: missing required field 'model'"),
    ({"remote": {**REMOTE["remote"], "key_file": "fleet-key"}}, "/tenants/cloud/remote/key_file: 'fleet-key' is a credential of the resident's own"),
    ({"remote": {**REMOTE["remote"], "key_file": "../etc/key"}}, "/tenants/cloud/remote/key_file: expected an absolute path, or the name of a systemd credential"),
    ({"remote": {**REMOTE["remote"], "model": "gpt 4"}}, "/tenants/cloud/remote/model: expected a model name"),
    ({"remote": {**REMOTE["remote"], "max_concurrent": 0}}, "/tenants/cloud/remote/max_concurrent: must be >= 1"),
    ({"remote": {**REMOTE["remote"], "poll_seconds": 0.5}}, "/tenants/cloud/remote/poll_seconds: must be >= 1"),
    ({"remote": {**REMOTE["remote"], "timeout": 5}}, "/tenants/cloud/remote/timeout: unknown field (did you mean 'timeout_seconds'?)"),
])  # fmt: skip
def test_what_a_remote_tenant_cannot_have_is_one_line_naming_the_field(change: dict[str, Any], said: str) -> None:
    doc = _doc(**change)
    if change.get("remote") is None and "remote" in change:
        doc["tenants"]["cloud"]["remote"] = None
    problems = _problems(doc)
    assert any(p.startswith(said) for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_backend_and_remote_go_together_and_a_local_tenant_names_its_model() -> None:
    doc = _doc()
    del doc["tenants"]["cloud"]["remote"]
    assert _problems(doc) == ["/tenants/cloud/remote: backend 'openai' needs 'remote': the server's base_url and model (and its key_file)"]
    doc = _doc(backend="transformers")
    assert "/tenants/cloud/remote: only for backend 'openai' (a remote server); this tenant's backend is 'transformers'" in _problems(doc)
    assert any(p.startswith("/tenants/cloud/model: missing required field 'model'") for p in _problems(doc))


def test_a_remote_tenant_counts_toward_no_max_loaded() -> None:
    doc = _doc()
    doc["tenants"]["chat"]["pinned"] = True
    doc["hosts"]["edge-1"]["max_loaded"] = 1  # the pinned one fills it: the remote one never needs a place
    assert _problems(doc) == []


def test_peers_never_relay_a_remote_tenant() -> None:
    doc = _doc()
    doc["hosts"]["edge-1"]["endpoint"] = "http://edge-1.lan:8000"
    doc["hosts"]["edge-1"]["accept_from_peers"] = ["cloud"]
    assert _problems(doc) == ["/hosts/edge-1/accept_from_peers/0: tenant 'cloud' is remote (backend 'openai'): each host that serves it asks the remote itself"]


def test_the_cli_validates_and_plans_a_host_with_a_remote_tenant(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from tests.support.index import write_index
    from zoo_agent.cli.main import cli

    index = write_index(tmp_path / "index.json", _doc())
    runner = CliRunner()
    assert runner.invoke(cli, ["validate", str(index)]).exit_code == 0
    result = runner.invoke(cli, ["plan", "--index", str(index), "--root", str(tmp_path / "zoo"), "--host", "edge-1"])
    assert result.exit_code == 0, result.output
    assert "cloud" not in result.output  # nothing of it to fetch, nothing of it in the memory fit
    bad = _doc()
    bad["tenants"]["cloud"]["remote"]["base_url"] = "http://api.example.com/v1"
    result = runner.invoke(cli, ["validate", str(write_index(tmp_path / "bad.json", bad))])
    assert result.exit_code == 2 and "/tenants/cloud/remote/base_url" in result.output and "Traceback" not in result.output
