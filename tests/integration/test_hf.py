"""The hf source and `add` with the real huggingface_hub client against a hub-compatible
server on 127.0.0.1 (tests/support/hubserver.py), through HF_ENDPOINT (issue #4)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hubserver import HubServer, Repo, serve
from tests.support.world import World

TOKEN = "hf_" + "s3cr3t" * 6
BIG = os.urandom(5 << 20)
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": BIG, "tokenizer.json": b"{}" * 100}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with serve() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def _publish(hub: HubServer, repo_id: str = "org/tiny", files: dict[str, bytes] = FILES, **kw: object) -> str:
    repo = hub.repos.setdefault(repo_id, Repo(**kw))  # type: ignore[arg-type]
    return repo.commit(files)


def _declare(world: World, commit: str, repo_id: str = "org/tiny", files: dict[str, bytes] = FILES, version: str = "v1") -> None:
    world.artifact("m", version, files, source={"type": "hf", "repo": repo_id, "revision": commit})


def test_apply_fetches_from_the_hub_and_verifies(world: World, hub: HubServer) -> None:
    _declare(world, _publish(hub))
    result = world.run("apply", "--jobs", "3")
    assert result.exit_code == 0, result.output
    assert (world.root / "models/m/current/model.safetensors").read_bytes() == BIG
    manifest = json.loads((world.root / "models/m/current/manifest.json").read_text())
    assert manifest["source"]["type"] == "hf" and len(manifest["source"]["revision"]) == 40
    gets = [h for h in hub.log if h.method == "GET"]
    assert {h.path.rsplit("/", 1)[1] for h in gets} == set(FILES)
    assert all("/resolve/" + manifest["source"]["revision"] + "/" in h.path for h in gets)  # pinned commit, never a branch


def test_wrong_bytes_of_the_right_size_are_refused(world: World, hub: HubServer) -> None:
    _declare(world, _publish(hub))
    hub.faults.wrong_bytes.add("model.safetensors")
    result = world.run("apply")
    assert result.exit_code == 1
    assert "model.safetensors: sha256 " in result.stderr and "expected" in result.stderr
    assert not (world.root / "models/m/current").exists()
    assert [p for p in world.root.rglob("*") if ".tmp" in p.name] == []  # wrong bytes are never kept to resume


def test_dropped_connection_resumes_with_range_in_the_same_run(world: World, hub: HubServer) -> None:
    _declare(world, _publish(hub))
    hub.faults.drop_after["model.safetensors"] = 2 << 20
    result = world.run("apply")
    assert result.exit_code == 0, result.output
    ranges = [h.range for h in hub.log if h.path.endswith("model.safetensors")]
    assert ranges[0] == "" and ranges[1].startswith("bytes=")
    assert hub.bytes_sent("model.safetensors") <= len(BIG) + (1 << 20)


def test_killed_download_resumes_from_staging(world: World, hub: HubServer) -> None:
    """Kill half-way, rerun: the second run fetches at most the missing part plus one chunk."""
    _declare(world, _publish(hub))
    hub.faults.pause_at["model.safetensors"] = (3 << 20) + 12345
    proc = world.spawn("apply", "--jobs", "1")
    assert hub.faults.paused.wait(timeout=30)
    deadline = time.monotonic() + 20
    staged = 0
    while staged < 3 << 20 and time.monotonic() < deadline:  # the client writes whole 1 MiB chunks
        staged = sum(p.stat().st_size for p in world.root.rglob("model.safetensors"))
        time.sleep(0.05)
    assert staged == 3 << 20
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    hub.faults.resume.set()
    before = len(hub.log)
    result = world.run("apply")
    assert result.exit_code == 0, result.output
    assert "resuming an interrupted fetch" in result.stderr
    second = sum(h.sent for h in hub.log[before:] if h.path.endswith("model.safetensors"))
    assert second <= len(BIG) - staged + (1 << 20), (staged, second)
    assert second < len(BIG)
    assert (world.root / "models/m/current/model.safetensors").read_bytes() == BIG


def test_server_errors_are_retried_then_one_line(world: World, hub: HubServer) -> None:
    _declare(world, _publish(hub))
    hub.faults.status["config.json"] = 503
    result = world.run("apply")
    assert result.exit_code == 1
    assert "hf:org/tiny@" in result.stderr and ": config.json: HTTP 503 (gave up after 4 attempts)" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing repo", "hf:org/gone: private or missing; if you have access, provide a token with --hf-token-file FILE"),
        ("missing file", ": nope.json: no such file at revision"),
        ("missing revision", "hf:org/tiny: revision 0123456789012345678901234567890123456789 not found"),
    ],
)
def test_hub_errors_are_one_line(world: World, hub: HubServer, breakage: str, message: str) -> None:
    commit = _publish(hub)
    files = dict(FILES)
    if breakage == "missing repo":
        _declare(world, commit, repo_id="org/gone")
    elif breakage == "missing file":
        files["nope.json"] = b"x"
        _declare(world, commit, files=files)
    else:
        _declare(world, "0123456789012345678901234567890123456789")
    result = world.run("apply")
    assert result.exit_code == 1
    assert message in result.stderr
    assert "Traceback" not in result.output and "HfHubHTTPError" not in result.output


def test_gated_repo_needs_a_token_which_never_leaks(world: World, hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    commit = _publish(hub, token=TOKEN, gated=True)
    _declare(world, commit)
    result = world.run("apply", "--json")
    assert result.exit_code == 1
    assert "hf:org/tiny: gated; if you have access, provide a token with --hf-token-file FILE, the systemd credential 'hf-token', or HF_TOKEN" in result.stderr
    token_file = world.tmp / "hf-token"
    token_file.write_text(TOKEN + "\n")
    hub.faults.wrong_bytes.add("tokenizer.json")  # an error path too: the token must not appear in it
    failed = world.run("--debug", "apply", *world.args("--hf-token-file", str(token_file), "--json"))
    hub.faults.wrong_bytes.clear()
    ok = world.run("apply", "--hf-token-file", str(token_file), "--json")
    assert ok.exit_code == 0, ok.output
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(world.tmp))  # systemd's LoadCredential=hf-token:...
    assert world.run("verify", "--json").exit_code == 0
    texts = [result.output, failed.output, ok.output] + [p.read_text(errors="replace") for p in world.root.rglob("*") if p.is_file() and p.stat().st_size < 1 << 20]
    assert all(TOKEN not in text for text in texts)
    assert any(h.authorization for h in hub.log)


def test_offline_makes_no_request_and_reports_missing(world: World, hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    _declare(world, _publish(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = world.run("apply")
    assert result.exit_code == 1
    assert "missing from the zoo, and offline mode" in result.stderr
    assert hub.log == []


def test_add_pins_a_hub_repository(world: World, hub: HubServer) -> None:
    files = {**FILES, "pytorch_model.bin": b"pickle" * 10, "README.md": b"# tiny"}
    first = _publish(hub, files=files)
    world.write_index()
    refused = world.raw("add", "hf:org/tiny", "--id", "tiny", "--index", str(world.index))
    assert refused.exit_code == 2 and "has pickle files" in refused.stderr and "--exclude '*.bin'" in refused.stderr
    result = world.raw("add", "hf:org/tiny", "--id", "tiny", "--exclude", "*.bin", "--index", str(world.index))
    assert result.exit_code == 0, result.output
    entry = json.loads(world.index.read_text())["models"]["tiny"]
    assert entry["source"] == {"type": "hf", "repo": "org/tiny", "revision": first}
    assert entry["version"] == first[:12] and entry["license"] == "Apache-2.0"
    assert {f["path"] for f in entry["files"]} == {"config.json", "model.safetensors", "tokenizer.json", "README.md"}
    import hashlib

    assert all(f["sha256"] == hashlib.sha256(files[f["path"]]).hexdigest() for f in entry["files"])
    from click.testing import CliRunner

    from zoo_agent.cli.main import cli

    assert CliRunner().invoke(cli, ["fmt", "--check", str(world.index)]).exit_code == 0
    second = hub.repos["org/tiny"].commit({**files, "config.json": b'{"model_type": "llama", "v": 2}'})
    updated = world.raw("add", "--update", "tiny", "--exclude", "*.bin", "--index", str(world.index))
    assert updated.exit_code == 0, updated.output
    entry = json.loads(world.index.read_text())["models"]["tiny"]
    assert entry["source"]["revision"] == second and entry["version"] == second[:12]


def test_add_update_at_the_same_commit_attaches_provenance_and_keeps_the_version(world: World, hub: HubServer) -> None:
    """Issue #35: `--update` of an hf entry whose commit did not move still takes `--provenance`
    (and tags, a description): the same bytes, so the same version label."""
    commit = _publish(hub)
    world.write_index()
    assert world.raw("add", "hf:org/tiny", "--id", "tiny", "--license", "MIT", "--index", str(world.index)).exit_code == 0
    before = json.loads(world.index.read_text())["models"]["tiny"]
    provenance = {"run": {"id": "run-9", "metrics": {"loss": 1.25}}, "created_by": "ci/train-job"}
    prov = world.tmp / "provenance.json"
    prov.write_text(json.dumps(provenance))
    result = world.raw("add", "--update", "tiny", "--provenance", str(prov), "--tag", "eval-done", "--index", str(world.index))
    assert result.exit_code == 0, result.output
    assert f"already pinned at {commit}" in result.output and f"version {commit[:12]} kept" in result.output
    entry = json.loads(world.index.read_text())["models"]["tiny"]
    assert entry == {**before, "provenance": provenance, "tags": ["eval-done"]}
    untouched = world.index.read_bytes()
    again = world.raw("add", "--update", "tiny", "--index", str(world.index))  # nothing new: nothing written
    assert again.exit_code == 0 and f"already pinned at {commit}" in again.output and world.index.read_bytes() == untouched
    prov.write_text(json.dumps({"run": {"metrics": {"loss": "low"}}}))
    bad = world.raw("add", "--update", "tiny", "--provenance", str(prov), "--index", str(world.index))
    assert bad.exit_code == 2 and str(prov) in bad.stderr and "Traceback" not in bad.output and world.index.read_bytes() == untouched


def test_add_file_pins_an_adapter_from_a_training_run(world: World) -> None:
    world.artifact("m", "v1", {"a": b"1"})
    run = world.tmp / "out" / "adapter"
    run.mkdir(parents=True)
    (run / "adapter_config.json").write_text(json.dumps({"r": 16, "base_model_name_or_path": "tiny"}))
    (run / "adapter_model.safetensors").write_bytes(b"weights")
    result = world.raw("add", f"file:{run}", "--id", "review", "--lora-for", "m", "--version", "run-7", "--license", "MIT", "--index", str(world.index))
    assert result.exit_code == 0, result.output
    entry = json.loads(world.index.read_text())["loras"]["review"]
    assert entry["rank"] == 16 and entry["base_model"] == "m" and entry["source"] == {"type": "file", "path": "out/adapter"}
    again = world.raw("add", f"file:{run}", "--id", "review", "--lora-for", "m", "--version", "run-8", "--license", "MIT", "--index", str(world.index))
    assert again.exit_code == 2 and "already exists; use --update review" in again.stderr


def test_add_file_pins_a_gguf_adapter_with_the_rank_its_header_gives(world: World) -> None:
    """convert_lora_to_gguf.py's layout (issue #33): no adapter_config.json; lora_a tensors of [in, r]."""
    import gguf
    import numpy as np

    world.artifact("m", "v1", {"a": b"1"})
    run = world.tmp / "out" / "gguf"
    run.mkdir(parents=True)
    writer = gguf.GGUFWriter(str(run / "code.gguf"), "qwen2")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 16.0)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((8, 64), np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((64, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = world.raw("add", f"file:{run}", "--id", "code", "--lora-for", "m", "--version", "1", "--license", "MIT", "--index", str(world.index))
    assert result.exit_code == 0, result.output
    entry = json.loads(world.index.read_text())["loras"]["code"]
    assert (entry["rank"], entry["format"], [f["path"] for f in entry["files"]]) == (8, "gguf", ["code.gguf"])
    # World's tenant t is a transformers tenant of m, attaching every adapter: a GGUF one is refused, naming the field
    world.loras["code"] = entry
    world.write_index()
    refused = world.raw("validate", str(world.index))
    assert refused.exit_code != 0 and "/tenants/t/loras/0: backend 'transformers' loads peft adapters (safetensors); adapter 'code' has format 'gguf'" \
        in refused.output, refused.output  # fmt: skip


def test_add_refuses_what_would_make_the_index_invalid(world: World, tmp_path: Path) -> None:
    world.artifact("m", "v1", {"a": b"1"})
    before = world.index.read_bytes()
    src = tmp_path / "w"
    src.mkdir()
    (src / "x.safetensors").write_bytes(b"x")
    result = world.raw("add", f"file:{src}", "--id", "r", "--lora-for", "ghost", "--rank", "4", "--version", "1", "--license", "MIT", "--index", str(world.index))
    assert result.exit_code == 2
    assert "/loras/r/base_model: unknown model 'ghost'" in result.stderr
    assert world.index.read_bytes() == before
