"""The index as a model registry (issue #35): typed metadata carried from the index onto disk
(manifest.json), into the resident's model-info.json and out through status --json."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pytest

from tests.integration.conftest import World

PROVENANCE: dict[str, Any] = {
    "dataset": {"id": "org/reviews", "revision": "v3", "url": "https://example.org/reviews"},
    "training": {"repository": "https://git.example.org/train", "commit": "0123456789abcdef", "command": "python train.py"},
    "run": {"id": "run-42", "metrics": {"loss": 2.143, "steps": 1000}},
    "reproducibility": {"seed": 7, "environment": {"torch": "2.4.0"}},
    "created_by": "ci/train-job",
    "created_at": "2026-01-31T12:00:00Z",
    "pipeline": "a free-form fact, as indexes wrote before",
}


def _expected_digest(files: dict[str, bytes]) -> str:
    """Written out here, not imported: sorted [path, sha256] pairs as canonical JSON, as peers.py hashes them."""
    pairs = sorted([name, hashlib.sha256(data).hexdigest()] for name, data in files.items())
    return "sha256:" + hashlib.sha256(json.dumps({"files": pairs}, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _declare(world: World, files: dict[str, bytes], **metadata: Any) -> None:
    world.artifact("m", "v1", files)
    world.models["m"].update(metadata)
    world.write_index()


def test_apply_records_the_metadata_and_whole_version_digest_and_status_shows_it(world: World) -> None:
    files = {"config.json": b"{}", "w.safetensors": b"weights"}
    _declare(world, files, description="A model.", tags=["chat", "code-review"], provenance=PROVENANCE)
    assert world.run("apply").exit_code == 0
    manifest = json.loads((world.root / "models/m/versions/v1/manifest.json").read_text())
    assert manifest["digest"] == _expected_digest(files)
    assert manifest["metadata"] == {"description": "A model.", "license": "MIT", "format": "safetensors", "tags": ["chat", "code-review"],
                                    "provenance": PROVENANCE}  # fmt: skip
    status = world.run("status", "--json")
    assert status.exit_code == 0, status.output
    (row,) = [r for r in json.loads(status.stdout)["artifacts"] if r["id"] == "m"]
    assert row["digest"] == _expected_digest(files)


def test_metadata_corrected_without_new_bytes_is_recorded_by_the_next_apply_files_untouched(world: World) -> None:
    files = {"config.json": b"{}", "w.safetensors": b"weights"}
    _declare(world, files, description="first")
    assert world.run("apply").exit_code == 0
    vdir = world.root / "models/m/versions/v1"
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in vdir.iterdir() if p.name != "manifest.json"}
    world.models["m"]["description"] = "second"
    world.models["m"]["provenance"] = {"run": {"metrics": {"loss": 1.5}}}
    world.write_index()
    result = world.run("apply")
    assert result.exit_code == 0, result.output
    manifest = json.loads((vdir / "manifest.json").read_text())
    assert manifest["metadata"]["description"] == "second" and manifest["metadata"]["provenance"] == {"run": {"metrics": {"loss": 1.5}}}
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in vdir.iterdir() if p.name != "manifest.json"} == before
    assert oct(os.stat(vdir / "manifest.json").st_mode & 0o777) == "0o440"
    assert world.run("status").exit_code == 0  # nothing drifted
    mtime = (vdir / "manifest.json").stat().st_mtime_ns
    assert world.run("apply").exit_code == 0
    assert (vdir / "manifest.json").stat().st_mtime_ns == mtime  # unchanged metadata: the manifest is not rewritten


def test_model_info_carries_the_declared_metadata_beside_the_runtime_facts(world: World) -> None:
    """index -> manifest.json -> the resident's model-info.json -> status --json: one round trip."""
    pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")
    from tests.integration.test_resident import Resident
    from zoo_agent.resident.tiny import build_tiny_model

    src = build_tiny_model(world.tmp / "tiny")
    files = {p.name: p.read_bytes() for p in sorted(src.iterdir())}
    _declare(world, files, description="The tiny one.", provenance=PROVENANCE)
    world.tenant = {"generation": {"temperature": 0, "max_tokens": 4}}
    world.write_index()
    assert world.run("apply").exit_code == 0
    resident = Resident(world)
    try:
        resident.notify.wait(lambda m: "READY" in m)
        info = json.loads((world.root / "resident/tenants/t/model-info.json").read_text())
        status = json.loads(world.run("status", "--json").stdout)
    finally:
        resident.stop()
    assert info["model"] == "m" and info["version"] == "v1" and info["footprint"]["weights"] > 0  # the runtime facts stay
    assert info["description"] == "The tiny one." and info["provenance"] == PROVENANCE
    assert info["quantization"] is None  # the tiny model's config.json declares none
    assert info["digest"] == _expected_digest(files) == next(r["digest"] for r in status["artifacts"] if r["id"] == "m")
