"""Every number and size of an index is bounded, and a backend is given only weights it can
load (issue #31): thousands of digits in ``memory_budget`` were a traceback in validate and
plan (a float overflow in human_bytes, Python's int-from-string limit), and a transformers
tenant on a gguf model passed validate and failed at its first request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.support.index import SHA_A, write_index
from zoo_agent.cli.main import cli
from zoo_agent.index.fit import human_bytes, kv_bytes, read_config

NINES = "9" * 5000


def _invoke(tmp_path: Path, doc: dict[str, Any], *command: str) -> tuple[int, str]:
    path = write_index(tmp_path / "index.json", doc)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["validate", str(path)] if not command else [*command, "--index", str(path), "--root", str(tmp_path / "zoo"), "--host", "edge-1"]
    result = CliRunner().invoke(cli, args)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no zoo made
    return result.exit_code, result.stderr


BOUNDED: list[tuple[str, Any, str]] = [
    ("/hosts/edge-1/memory_budget", "9" * 400,
     "expected a size in systemd's notation such as 512M or 8G (at most 16 digits), got \"999999999999999999999999999999999999999… (402 characters)"),
    ("/hosts/edge-1/memory_budget", NINES,
     "expected a size in systemd's notation such as 512M or 8G (at most 16 digits), got \"999999999999999999999999999999999999999… (5002 characters)"),
    ("/hosts/edge-1/memory_budget", "99999999999999999T",
     "expected a size in systemd's notation such as 512M or 8G (at most 16 digits), got \"99999999999999999T\""),
    ("/tenants/chat/resources/memory_max", NINES,
     "expected a size in systemd's notation such as 512M or 8G (at most 16 digits), got \"999999999999999999999999999999999999999… (5002 characters)"),
    ("/models/qwen/files/1/size", 2**53, "must be <= 9007199254740991, got 9007199254740992"),
    ("/models/qwen/files/1/size", 10**39, "must be <= 9007199254740991, got 1" + "0" * 39),
    ("/tenants/chat/generation/top_k", 10**7, "must be <= 1000000, got 10000000"),
    ("/tenants/chat/generation/seed", 2**64, "must be <= 9007199254740991, got 18446744073709551616"),
]  # fmt: skip


def _put(doc: dict[str, Any], pointer: str, value: Any) -> None:
    *parents, last = [int(p) if p.isdigit() else p for p in pointer.strip("/").split("/")]
    node: Any = doc
    for part in parents:
        node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
    node[last] = value


@pytest.mark.parametrize(("pointer", "value", "message"), BOUNDED)
@pytest.mark.parametrize("command", [(), ("plan",)])
def test_a_number_past_its_bound_is_one_line_exit_2(tmp_path: Path, index_doc: dict[str, Any], command: tuple[str, ...],
                                                    pointer: str, value: Any, message: str) -> None:  # fmt: skip
    _put(index_doc, pointer, value)
    path = tmp_path / "index.json"
    assert _invoke(tmp_path, index_doc, *command) == (2, f"{path}: {pointer}: {message}\n")


@pytest.mark.parametrize(("rule", "message"), [
    ({"min_words": 10**6 + 1}, "must be <= 1000000, got 1000001"),
    ({"max_messages": 10**30}, "must be <= 1000000, got 1000000000000000000000000000000"),
])  # fmt: skip
def test_route_counts_are_bounded(tmp_path: Path, index_doc: dict[str, Any], rule: dict[str, int], message: str) -> None:
    index_doc["routes"] = {"r": {"rules": [{"tenant": "chat", "when": rule}], "default": "chat"}}
    (key,) = rule
    assert _invoke(tmp_path, index_doc) == (2, f"{tmp_path / 'index.json'}: /routes/r/rules/0/when/{key}: {message}\n")


def test_an_integer_of_thousands_of_digits_is_named_not_a_python_limit(tmp_path: Path, index_doc: dict[str, Any]) -> None:
    path = tmp_path / "index.json"
    path.write_text(json.dumps(index_doc).replace('"size": 659', f'"size": {NINES}'))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert (result.exit_code, result.stderr) == (2, f"{path}: the number {'9' * 24}… has 5000 digits; no field of an index holds such a number\n")


def test_the_largest_bounded_values_are_valid_and_print(tmp_path: Path, index_doc: dict[str, Any]) -> None:
    index_doc["hosts"]["edge-1"]["memory_budget"] = "9" * 16 + "T"
    index_doc["models"]["qwen"]["files"][1]["size"] = 2**53 - 1
    index_doc["tenants"]["chat"]["generation"] = {"top_k": 10**6, "seed": 2**53 - 1}
    assert _invoke(tmp_path, index_doc) == (0, "")
    assert human_bytes(kv_bytes({"num_hidden_layers": 10**400, "num_attention_heads": 10**400, "hidden_size": 10**800,
                                 "max_position_embeddings": 10**400}, dtype="float32", max_batch=256)).endswith(" TB")  # fmt: skip


def test_a_config_json_nested_100000_deep_is_no_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert read_config(tmp_path) is None


@pytest.mark.parametrize(("fmt", "pointer", "message"), [
    ("gguf", "/tenants/chat/backend", "backend 'transformers' loads safetensors (or pickle) weights; model 'qwen' has format 'gguf'"),
    ("onnx", "/tenants/chat/backend", "backend 'transformers' loads safetensors (or pickle) weights; model 'qwen' has format 'onnx'"),
    ("ollama", "/tenants/chat/backend", "backend 'transformers' loads safetensors (or pickle) weights; model 'qwen' has format 'ollama'"),
])  # fmt: skip
def test_a_transformers_tenant_needs_weights_transformers_loads(tmp_path: Path, index_doc: dict[str, Any], fmt: str, pointer: str, message: str) -> None:
    index_doc["models"]["qwen"]["format"] = fmt
    if fmt == "gguf":  # a well-formed GGUF model, so the backend is the one problem
        for f in index_doc["models"]["qwen"]["files"]:
            f["path"] = f["path"].replace(".safetensors", ".gguf")
    assert _invoke(tmp_path, index_doc) == (2, f"{tmp_path / 'index.json'}: {pointer}: {message}\n")


def test_adapters_and_embedders_need_formats_their_loaders_read(tmp_path: Path, index_doc: dict[str, Any]) -> None:
    index_doc["loras"]["review"]["format"] = "gguf"
    for f in index_doc["loras"]["review"]["files"]:  # a well-formed GGUF adapter: its tenant's backend is the problem
        f["path"] = f["path"].replace(".safetensors", ".gguf")
    index_doc["models"]["embed"] = {"version": "1", "source": {"type": "file", "path": "e"}, "format": "onnx", "license": "MIT",
                                    "files": [{"path": "model.onnx", "sha256": SHA_A, "size": 10}]}  # fmt: skip
    index_doc["tenants"]["chat"]["adapter_selection"] = {"embedding_model": "embed"}
    index_doc["routes"] = {"r": {"rules": [{"tenant": "chat", "when": {"similar_to": "code review"}}], "default": "chat",
                                 "embedding_model": "embed"}}  # fmt: skip
    code, err = _invoke(tmp_path, index_doc)
    path = tmp_path / "index.json"
    assert (code, err.splitlines()) == (2, [
        f"{path}: /tenants/chat/loras/0: backend 'transformers' loads peft adapters (safetensors); adapter 'review' has format 'gguf'",
        f"{path}: /tenants/chat/adapter_selection/embedding_model: adapter selection embeds with transformers from safetensors; model 'embed' has format 'onnx'",
        f"{path}: /routes/r/embedding_model: the router embeds with transformers from safetensors; model 'embed' has format 'onnx'",
        f"{path}: invalid (3 problems)",
    ])  # fmt: skip


def test_pickle_weights_still_load_with_transformers_when_allowed(tmp_path: Path, index_doc: dict[str, Any]) -> None:
    qwen = index_doc["models"]["qwen"]
    qwen.update(format="pickle", allow_pickle=True)
    qwen["files"][1]["path"] = "pytorch_model.bin"
    assert _invoke(tmp_path, index_doc) == (0, "")
