"""The library API for programs on the host: open, current, load_transformers, entry_for (issue #18)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import zoo_agent
from tests.support.world import World
from zoo_agent.errors import IntegrityError, StoreError, UsageError
from zoo_agent.reconcile.apply import reverify
from zoo_agent.reconcile.observe import observe

pytestmark = pytest.mark.resident


def _applied(world: World, files: dict[str, bytes]) -> zoo_agent.HostZoo:
    world.artifact("m", "v1", files)
    assert world.run("apply").exit_code == 0
    return zoo_agent.open(world.root)


def test_current_is_the_verified_directory_of_the_current_version(world: World) -> None:
    zoo = _applied(world, {"config.json": b"{}", "w.safetensors": b"weights"})
    path = zoo.current("model", "m")
    assert path == world.root / "models/m/versions/v1" and (path / "w.safetensors").read_bytes() == b"weights"


def test_current_names_the_fix_when_there_is_none_or_a_file_drifted(world: World) -> None:
    zoo = _applied(world, {"config.json": b"{}", "w.safetensors": b"AAAA"})
    with pytest.raises(StoreError, match=r"models/nope: no current version; run: zoo-agent apply$"):
        zoo.current("model", "nope")
    with pytest.raises(UsageError, match="expected 'model' or 'lora'"):
        zoo.current("dataset", "m")
    target = world.root / "models/m/current/w.safetensors"
    os.chmod(target, 0o640)
    target.write_bytes(b"BBBB")
    with pytest.raises(IntegrityError, match=r"w.safetensors: .* since it was verified; run: zoo-agent verify m$"):
        zoo.current("model", "m")


def test_strict_re_hashes_what_a_stat_cannot_see(world: World) -> None:
    zoo = _applied(world, {"config.json": b"{}", "w.safetensors": b"AAAA"})
    manifest_path = world.root / "models/m/current/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = [{**f, "sha256": "0" * 63 + "1"} if f["path"] == "w.safetensors" else f for f in manifest["files"]]
    os.chmod(manifest_path, 0o640)
    manifest_path.write_text(json.dumps(manifest))  # the stat of every file still matches
    assert zoo.current("model", "m") == world.root / "models/m/versions/v1"
    with pytest.raises(IntegrityError, match="sha256 differs from the manifest; run: zoo-agent verify --repair m"):
        zoo.current("model", "m", strict=True)


def test_open_refuses_a_missing_zoo(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"no zoo here; run: zoo-agent apply --root "):
        zoo_agent.open(tmp_path / "none")


def test_entry_for_is_what_add_file_writes(world: World) -> None:
    world.artifact("m", "v1", {"config.json": b"{}"})
    out = world.tmp / "train" / "run-7"
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text('{"r": 8}')
    (out / "adapter_model.safetensors").write_bytes(b"adapter")
    entry = zoo_agent.entry_for(out, version="7", license="MIT", index=world.index, lora_for="m")
    result = world.raw("add", f"file:{out}", "--id", "a", "--version", "7", "--license", "MIT", "--lora-for", "m",
                       "--index", str(world.index))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(world.index.read_text())["loras"]["a"] == entry
    assert entry["source"] == {"type": "file", "path": "train/run-7"} and entry["rank"] == 8


def test_a_directory_outside_the_index_directory_is_pinned_absolute(world: World, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A relative '../..' path would be refused by validate; add and entry_for write it absolute."""
    world.artifact("m", "v1", {"config.json": b"{}"})
    elsewhere = tmp_path_factory.mktemp("shared-storage")
    (elsewhere / "w.safetensors").write_bytes(b"w")
    result = world.raw("add", f"file:{elsewhere}", "--id", "n", "--version", "1", "--license", "MIT", "--index", str(world.index))
    assert result.exit_code == 0, result.output
    assert json.loads(world.index.read_text())["models"]["n"]["source"]["path"] == str(elsewhere.resolve())
    assert world.raw("validate", str(world.index)).exit_code == 0


def test_reverify_keeps_when_a_version_was_published(world: World) -> None:
    """gc keeps the newest by publication; a verify that re-hashes v1 must not make it 'newest'."""
    world.artifact("m", "v1", {"config.json": b"{}", "w.safetensors": b"one"})
    assert world.run("apply").exit_code == 0
    world.artifact("m", "v2", {"config.json": b"{}", "w.safetensors": b"two"})
    assert world.run("apply").exit_code == 0
    reverify(zoo_agent.Zoo(world.root), "models", "m", "v1", None)  # what verify --repair and apply run on drift
    seen = observe(zoo_agent.Zoo(world.root)).seen[("models", "m")]
    assert seen.versions["v1"].published_at < seen.versions["v2"].published_at
    assert seen.versions["v1"].verified_at > seen.versions["v2"].verified_at


def test_load_transformers_applies_the_index_safety(world: World) -> None:
    pytest.importorskip("transformers", reason="the resident extra is not installed (pip install -e .[resident])")
    from zoo_agent.demo.tiny import build_tiny_model
    from zoo_agent.pin import Selection, pin_directory

    src = build_tiny_model(world.tmp / "src" / "m" / "v1")
    world.models["m"] = {"version": "v1", "source": {"type": "file", "path": "src/m/v1"},
                         "files": pin_directory(src, Selection()), "license": "MIT"}  # fmt: skip
    world.write_index()
    assert world.run("apply").exit_code == 0
    model, tokenizer = zoo_agent.open(world.root).load_transformers("m")
    ids = tokenizer("hello", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2
    with pytest.raises(UsageError, match="model 'x' is not in the applied index"):
        zoo_agent.open(world.root).load_transformers("x")


def test_unreadable_meminfo_means_a_stop_first_reload_not_infinite_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit with ProcSubset=pid hides /proc/meminfo; the fit check must not read that as 'fits'."""
    from zoo_agent.resident import memory

    def hidden(path: str, *args: object, **kwargs: object) -> object:
        raise FileNotFoundError(2, "No such file or directory", path)

    monkeypatch.setattr(memory, "open", hidden, raising=False)
    assert memory.mem_available() is None
