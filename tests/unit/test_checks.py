"""Every semantic and structural rule of the index, one literal case each (issue #2)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.support.index import SHA_A, write_index
from zoo_agent.cli.main import cli
from zoo_agent.index.load import check_document

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.strip("/").split("/")]
        node: Any = doc
        for part in parents:
            node = node[part]
        node[last] = value

    return mutate


def _delete(path: str) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.strip("/").split("/")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        del node[last]

    return mutate


def _both(*mutations: Mutation) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        for m in mutations:
            m(doc)

    return mutate


CASES: list[tuple[str, Mutation, str, str]] = [
    # (name, mutation, pointer, message fragment)
    ("tenant→model", _set("/tenants/chat/model", "nope"), "/tenants/chat/model", "unknown model 'nope' (declared models: llama, qwen)"),
    ("tenant→lora", _set("/tenants/chat/loras", ["review", "ghost"]), "/tenants/chat/loras/1", "unknown lora 'ghost'"),
    ("host→tenant", _set("/hosts/edge-1/resident", "ghost"), "/hosts/edge-1/resident", "unknown tenant 'ghost'"),
    ("host→available", _set("/hosts/edge-1/available", ["ghost"]), "/hosts/edge-1/available/0", "unknown model 'ghost'"),
    ("lora→base", _set("/loras/review/base_model", "ghost"), "/loras/review/base_model", "unknown model 'ghost'"),
    ("lora fits tenant model",
     _both(_set("/loras/review/base_model", "llama"), _set("/tenants/chat/loras", ["review"])),
     "/tenants/chat/loras/0", "adapter 'review' is built for model 'llama', but the tenant runs 'qwen'"),
    ("composition past max_loras",
     _both(_set("/tenants/chat/adapter_selection", {"embedding_model": "qwen", "max_adapters": 3}), _set("/tenants/chat/resources", {"max_loras": 2})),
     "/tenants/chat/adapter_selection/max_adapters", "composes up to 3 adapters, more than resources.max_loras (2) keeps loaded"),
    ("max_adapters range", _set("/tenants/chat/adapter_selection", {"embedding_model": "qwen", "max_adapters": 9}),
     "/tenants/chat/adapter_selection/max_adapters", "must be <= 8, got 9"),
    ("combine enum", _set("/tenants/chat/adapter_selection", {"embedding_model": "qwen", "combine": "cat"}),
     "/tenants/chat/adapter_selection/combine", 'expected one of "sum", "weighted", got "cat"'),
    ("lora listed twice", _set("/tenants/chat/loras", ["review", "review"]), "/tenants/chat/loras", "more than once"),
    ("absolute path", _set("/models/qwen/files/0/path", "/etc/passwd"), "/models/qwen/files/0/path", "must be relative"),
    ("dotdot path", _set("/models/qwen/files/0/path", "a/../../x"), "/models/qwen/files/0/path", "must not climb out with '..'"),
    ("backslash", _set("/models/qwen/files/0/path", "sub\\x.json"), "/models/qwen/files/0/path", "backslash"),
    ("NUL", _set("/models/qwen/files/0/path", "a\u0000b"), "/models/qwen/files/0/path", "NUL"),
    ("unnormalized", _set("/models/qwen/files/0/path", "./sub//config.json"), "/models/qwen/files/0/path", "is not normalized (write 'sub/config.json')"),
    ("dot", _set("/models/qwen/files/0/path", "."), "/models/qwen/files/0/path", "is not normalized"),
    ("duplicate path", _set("/models/qwen/files/1/path", "config.json"), "/models/qwen/files/1/path", "duplicate of /models/qwen/files/0/path"),
    ("short sha", _set("/models/qwen/files/0/sha256", "abc"), "/models/qwen/files/0/sha256", 'expected 64 lowercase hex characters, got "abc"'),
    ("upper sha", _set("/models/qwen/files/0/sha256", SHA_A.upper()), "/models/qwen/files/0/sha256", "expected 64 lowercase hex characters"),
    ("zero sha", _set("/models/qwen/files/0/sha256", "0" * 64), "/models/qwen/files/0/sha256", "is a placeholder"),
    ("deadbeef sha", _set("/models/qwen/files/0/sha256", "deadbeef" * 8), "/models/qwen/files/0/sha256", "is a placeholder"),
    ("empty-file sha", _set("/models/qwen/files/0/sha256", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"), "/models/qwen/files/0/sha256", "sha256 of an empty file"),
    ("TODO sha", _set("/models/qwen/files/0/sha256", "TODO"), "/models/qwen/files/0/sha256", "'sha256' still holds a placeholder ('TODO')"),
    ("stub anywhere", _set("/loras/review/description", "TODO-STUB-describe-me"), "/loras/review/description", "'description' still holds a placeholder"),
    ("changeme", _set("/models/qwen/source/repo", "changeme"), "/models/qwen/source/repo", "still holds a placeholder"),
    ("xxx", _set("/models/qwen/source/revision", "xxxx"), "/models/qwen/source/revision", "still holds a placeholder"),
    ("zero size", _set("/models/qwen/files/0/size", 0), "/models/qwen/files/0/size", "must be > 0, got 0"),
    ("negative size", _set("/models/qwen/files/0/size", -5), "/models/qwen/files/0/size", "must be > 0, got -5"),
    ("float size", _set("/models/qwen/files/0/size", 1.5), "/models/qwen/files/0/size", "expected integer, got number"),
    ("string size", _set("/models/qwen/files/0/size", "12"), "/models/qwen/files/0/size", "expected integer, got string"),
    ("pickle file", _set("/models/qwen/files/1/path", "pytorch_model.bin"), "/models/qwen/files/1/path", "is a pickle file, which runs code when loaded"),
    ("pickle format", _set("/models/qwen/format", "pickle"), "/models/qwen/format", "set allow_pickle: true"),
    ("code file", _set("/models/qwen/files/1/path", "modeling_qwen.py"), "/models/qwen/files/1/path", "is repository code; remove it or set allow_code: true"),
    ("license unknown", _set("/models/qwen/license", "apache"), "/models/qwen/license", "expected an SPDX license identifier"),
    ("license case", _set("/models/qwen/license", "apache-2.0"), "/models/qwen/license", "(did you mean 'Apache-2.0'?)"),
    ("branch revision", _set("/models/qwen/source/revision", "main"), "/models/qwen/source/revision", "expected a full 40-hex commit id"),
    ("bad id", _set("/models/Qwen", {}), "/models/Qwen", "bad id"),
    ("dot id", _set("/tenants/..", {"model": "qwen"}), "/tenants/..", "bad id"),
    ("typo field", _set("/models/qwen/verison", "x"), "/models/qwen/verison", "unknown field (did you mean 'version'?)"),
    ("missing field", _delete("/models/qwen/license"), "/models/qwen", "missing required field 'license'"),
    ("source type", _set("/models/qwen/source/type", "s3"), "/models/qwen/source/type", 'unknown source type "s3" (expected one of hf, ollama, url, file)'),
    ("source no type", _set("/models/qwen/source", {"repo": "a/b"}), "/models/qwen/source", "missing required field 'type'"),
    ("source field", _set("/models/qwen/source/branch", "main"), "/models/qwen/source/branch", "unknown field"),
    ("tmp version", _set("/models/qwen/version", "1.tmp"), "/models/qwen/version", "not containing '.tmp'"),
    ("slash version", _set("/models/qwen/version", "a/b"), "/models/qwen/version", "a version label"),
    ("ollama backend wrong source", _set("/tenants/chat/backend", "ollama"), "/tenants/chat/backend", "backend 'ollama' needs a model with an 'ollama' source"),
    ("ollama model under transformers", _set("/tenants/mac/backend", "transformers"), "/tenants/mac/backend", "comes from Ollama"),
    ("ollama with files", _set("/models/llama/files", [{"path": "x", "sha256": SHA_A, "size": 1}]), "/models/llama/files", "must be empty for an 'ollama' source"),
    ("no files", _set("/models/qwen/files", []), "/models/qwen/files", "lists no files"),
    ("lora from ollama", _set("/loras/review/source", {"type": "ollama", "name": "a:b", "digest": "sha256:" + SHA_A}), "/loras/review/source/type", "cannot come from an 'ollama' source"),
    ("temperature range", _set("/tenants/chat/generation", {"temperature": 3}), "/tenants/chat/generation/temperature", "must be <= 2, got 3"),
    ("memory notation", _set("/tenants/chat/resources", {"memory_max": "lots"}), "/tenants/chat/resources/memory_max", "systemd's notation"),
    ("enum backend", _set("/tenants/chat/backend", "vllm"), "/tenants/chat/backend", 'expected one of "transformers", "ollama", "llama.cpp", "openai", got "vllm"'),
    ("not an object", _set("/hosts", []), "/hosts", "expected object, got array"),
    ("url scheme", _set("/models/qwen/source", {"type": "url", "base_url": "ftp://x/y"}), "/models/qwen/source/base_url", "an http:// or https:// URL"),
    # issue #20: several tenants per host under a memory budget
    ("host→tenants", _set("/hosts/mini/tenants", ["mac", "ghost"]), "/hosts/mini/tenants/1", "unknown tenant 'ghost' (declared tenants: chat, mac)"),
    ("tenant listed twice", _set("/hosts/mini/tenants", ["mac", "mac"]), "/hosts/mini/tenants/1", "lists tenant 'mac' again (already /hosts/mini/tenants/0)"),
    ("resident and tenants", _set("/hosts/edge-1/tenants", ["mac"]), "/hosts/edge-1/resident", "set 'tenants' only, not both it and 'resident'"),
    ("pinned on demand", _both(_set("/tenants/chat/pinned", True), _set("/tenants/chat/fetch", "on-demand")), "/tenants/chat/fetch",
     "a pinned tenant is loaded at start, so it must be on disk before"),
    ("budget notation", _set("/hosts/mini/memory_budget", "8GB"), "/hosts/mini/memory_budget", "systemd's notation"),
    ("priority enum", _set("/tenants/chat/priority", "urgent"), "/tenants/chat/priority", 'expected one of "system", "realtime", "default", "batch"'),
    ("fetch enum", _set("/tenants/chat/fetch", "lazy"), "/tenants/chat/fetch", 'expected one of "eager", "on-demand"'),
    ("weights exceed the budget", _set("/hosts/edge-1/memory_budget", "512M"), "/hosts/edge-1/memory_budget",
     "tenant chat needs 988.1 MB of weights alone, more than the whole budget; the budget is 512M (536.9 MB)"),
    ("pinned weights together",
     _both(_set("/models/llama/source", {"type": "file", "path": "l"}), _set("/models/llama/format", "safetensors"),
           _set("/models/llama/files", [{"path": "model.safetensors", "sha256": SHA_A, "size": 3_400_000_000}]),
           _set("/tenants/mac", {"model": "llama", "pinned": True}), _set("/tenants/chat/pinned", True), _delete("/hosts/edge-1/resident"),
           _set("/hosts/edge-1/tenants", ["chat", "mac"]), _set("/hosts/edge-1/memory_budget", "4G")),
     "/hosts/edge-1/memory_budget", "pinned tenants chat (988.1 MB) and mac (3.4 GB) need 4.4 GB of weights alone; the budget is 4G (4.3 GB)"),
    # issue #34: idle unload and a cap on loaded tenants
    ("keep_alive notation", _set("/tenants/chat/keep_alive", "5 mins"), "/tenants/chat/keep_alive",
     "'5 mins' is not a time span in systemd's notation: cannot read 'mins'"),
    ("keep_alive bounded", _set("/tenants/chat/keep_alive", "1s " * 9), "/tenants/chat/keep_alive", "is not a time span in systemd's notation"),
    ("keep_alive pinned", _both(_set("/tenants/chat/pinned", True), _set("/tenants/chat/keep_alive", "5min")), "/tenants/chat/keep_alive",
     "a pinned tenant is never unloaded: remove keep_alive or unpin it"),
    ("max_loaded range", _set("/hosts/mini/max_loaded", 0), "/hosts/mini/max_loaded", "must be >= 1, got 0"),
    ("pinned past max_loaded",
     _both(_set("/tenants/mac/pinned", True), _set("/tenants/chat/pinned", True), _delete("/hosts/edge-1/resident"),
           _set("/hosts/edge-1/tenants", ["chat", "mac"]), _set("/hosts/edge-1/max_loaded", 1)),
     "/hosts/edge-1/max_loaded", "1 is fewer than the 2 pinned tenants (chat, mac), which are never paged out"),
    ("pinned fill max_loaded",
     _both(_set("/tenants/chat/pinned", True), _delete("/hosts/edge-1/resident"), _set("/hosts/edge-1/tenants", ["chat", "mac"]),
           _set("/hosts/edge-1/max_loaded", 1)),
     "/hosts/edge-1/max_loaded", "the pinned tenants (chat) fill all 1: mac could never load; raise max_loaded or unpin one"),
]


def test_valid_index_has_no_problems(index_doc: dict[str, Any]) -> None:
    idx, problems = check_document(index_doc)
    assert problems == []
    assert idx is not None and set(idx.models) == {"qwen", "llama"}


@pytest.mark.parametrize(("name", "mutate", "pointer", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_rule(index_doc: dict[str, Any], name: str, mutate: Mutation, pointer: str, fragment: str) -> None:
    mutate(index_doc)
    _, problems = check_document(index_doc)
    matching = [p for p in problems if p.pointer == pointer]
    assert matching, f"no problem at {pointer}; got {problems}"
    assert any(fragment in p.message for p in matching), matching


@pytest.mark.parametrize(("name", "mutate", "pointer", "fragment"), CASES[:12], ids=[c[0] for c in CASES[:12]])
def test_rule_through_cli(tmp_path: Path, index_doc: dict[str, Any], name: str, mutate: Mutation, pointer: str, fragment: str) -> None:
    """Exit 2, one line per problem naming file and pointer, no traceback, nothing written."""
    mutate(index_doc)
    path = write_index(tmp_path / "index.json", index_doc)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert any(line.startswith(f"{path}: {pointer}: ") and fragment in line for line in result.stderr.splitlines())
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_every_problem_is_reported_not_only_the_first(index_doc: dict[str, Any]) -> None:
    index_doc["tenants"]["chat"]["model"] = "ghost"
    index_doc["hosts"]["edge-1"]["resident"] = "ghost"
    index_doc["models"]["qwen"]["files"][0]["path"] = "/abs"
    _, problems = check_document(index_doc)
    assert {p.pointer for p in problems} >= {"/tenants/chat/model", "/hosts/edge-1/resident", "/models/qwen/files/0/path"}


def test_pickle_and_code_allowed_when_opted_in(index_doc: dict[str, Any]) -> None:
    qwen = index_doc["models"]["qwen"]
    qwen["files"][1]["path"] = "pytorch_model.bin"
    qwen["files"].append({"path": "modeling.py", "sha256": SHA_A, "size": 10})
    qwen.update(allow_pickle=True, allow_code=True)
    assert check_document(index_doc)[1] == []


def test_prose_mentioning_todo_is_not_a_placeholder(index_doc: dict[str, Any]) -> None:
    index_doc["loras"]["review"]["description"] = "Helps with todo lists and stubbed tests."
    assert check_document(index_doc)[1] == []


def test_a_host_serves_a_list_of_tenants(index_doc: dict[str, Any]) -> None:
    index_doc["hosts"]["mini"] = {"tenants": ["mac", "chat"], "memory_budget": "8G"}
    index_doc["tenants"]["mac"].update(pinned=True, priority="realtime")
    index_doc["tenants"]["chat"].update(fetch="on-demand", priority="batch")
    idx, problems = check_document(index_doc)
    assert problems == [] and idx is not None
    assert idx.hosts["mini"].served() == ("mac", "chat") and idx.hosts["edge-1"].served() == ("chat",)
