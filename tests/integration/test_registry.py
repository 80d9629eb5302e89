"""The index as a model registry (issue #35): typed metadata carried from the index onto disk
(manifest.json), into the resident's model-info.json and out through status --json."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pytest

from tests.support.world import World

pytestmark = pytest.mark.resident

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
    from tests.support.resident import Resident
    from zoo_agent.demo.tiny import build_tiny_model

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


def test_a_request_may_name_an_alias_and_is_answered_by_its_tenant(world: World) -> None:
    """Issue #35: `model` may be an alias of the model a tenant serves; the answer names the tenant
    (as OpenAI names the model an alias stands for), streamed or not, with an adapter suffix checked by the worker."""
    pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")
    import httpx

    from tests.support.resident import Resident
    from zoo_agent.demo.tiny import build_tiny_model

    src = build_tiny_model(world.tmp / "tiny")
    _declare(world, {p.name: p.read_bytes() for p in sorted(src.iterdir())}, aliases=["tiny-latest"])
    world.tenant = {"generation": {"temperature": 0, "max_tokens": 4}}
    world.write_index()
    assert world.run("apply").exit_code == 0
    resident = Resident(world)
    try:
        resident.wait_ready()
        answers = [httpx.post(resident.url + "/v1/completions", json={"model": name, "prompt": "Hello"}, timeout=120) for name in ("t", "tiny-latest")]
        assert [a.status_code for a in answers] == [200, 200], answers[1].text
        by_tenant, by_alias = (a.json() for a in answers)
        assert by_alias["model"] == "t" and by_alias["system_fingerprint"] == "m@v1"
        assert by_alias["choices"][0]["text"] == by_tenant["choices"][0]["text"]  # greedy: the same model answered
        body = {"model": "tiny-latest", "messages": [{"role": "user", "content": "Hello"}], "stream": True}
        streamed = httpx.post(resident.url + "/v1/chat/completions", json=body, timeout=120).text
        assert streamed.rstrip().endswith("data: [DONE]") and '"model": "t"' in streamed
        adapter = httpx.post(resident.url + "/v1/completions", json={"model": "tiny-latest:nosuch", "prompt": "Hello"}, timeout=120)
        assert adapter.status_code == 404 and "'t:nosuch' is not served here" in adapter.json()["error"]["message"]
        unknown = httpx.post(resident.url + "/v1/completions", json={"model": "tiny-oldest", "prompt": "Hello"}, timeout=120)
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    finally:
        resident.stop()


def _aliased(world: World, *aliases: str) -> None:
    if "m" not in world.models:
        world.artifact("m", "v1", {"config.json": b"{}", "w.safetensors": b"weights"})
    world.models["m"]["aliases"] = list(aliases)
    world.write_index()


def test_aliases_render_as_links_the_library_resolves_and_go_when_undeclared(world: World) -> None:
    import zoo_agent

    _aliased(world, "latest", "small")
    assert "would link alias latest to model m" in world.run("plan").output
    result = world.run("apply")
    assert result.exit_code == 0, result.output
    models = world.root / "models"
    assert {n: os.readlink(models / n) for n in ("latest", "small")} == {"latest": "m", "small": "m"}
    zoo = zoo_agent.open(world.root)
    assert zoo.current("model", "latest") == zoo.current("model", "m") == models / "m/versions/v1"  # the id's own path
    assert oct((zoo.current("model", "small") / "w.safetensors").stat().st_mode & 0o777) == "0o440"  # read-only, as published
    assert world.run("status").exit_code == 0 and "nothing to do" in world.run("plan").output
    _aliased(world, "small")
    assert world.run("apply").exit_code == 0
    assert not os.path.lexists(models / "latest") and os.readlink(models / "small") == "m"
    with pytest.raises(zoo_agent.StoreError, match="no current version"):
        zoo.current("model", "latest")
    assert json.loads((world.root / "host/aliases.json").read_text()) == {"models": {"small": "m"}}
    bk = world.tmp / "bk"
    assert world.run("backup", "--to", str(bk)).exit_code == 0  # an alias link is not an artifact to back up
    assert not (bk / "files/models/small").exists()


def test_an_alias_never_replaces_or_removes_what_the_zoo_did_not_make(world: World) -> None:
    """A real directory (with the user's files) at models/<alias>, and a link planted there pointing
    out of the zoo: apply fails that one step, naming the path, and leaves both as they were."""
    from tests.support.victim import make_victim, snapshot

    _aliased(world)
    assert world.run("apply").exit_code == 0
    occupied = make_victim(world.root / "models" / "latest")
    outside = make_victim(world.tmp / "victim")
    os.symlink(str(outside), world.root / "models" / "planted")
    before = (snapshot(occupied), snapshot(outside))
    _aliased(world, "latest", "planted", "fine")
    result = world.run("apply")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{world.root / 'models/latest'}: models/latest exists and the zoo did not make it" in result.output
    assert f"{world.root / 'models/planted'}: models/planted exists and the zoo did not make it" in result.output
    assert os.readlink(world.root / "models/fine") == "m"  # the rest was done
    assert (snapshot(occupied), snapshot(outside)) == before
    assert os.readlink(world.root / "models/planted") == str(outside)
    import zoo_agent

    with pytest.raises(zoo_agent.StoreError, match="is a link the zoo did not make"):
        zoo_agent.open(world.root).current("model", "planted")
    # A forged record does not make a foreign link ours: undeclaring removes only our own link.
    (world.root / "host/aliases.json").write_text(json.dumps({"models": {"planted": "m", "fine": "m", "latest": "m"}}))
    _aliased(world)
    result = world.run("apply")
    assert result.exit_code == 0, result.output
    assert (snapshot(occupied), snapshot(outside)) == before and os.readlink(world.root / "models/planted") == str(outside)
    assert not os.path.lexists(world.root / "models/fine")
    assert world.run("status").exit_code == 0  # the links are never taken for artifacts


def test_a_path_like_alias_is_refused_before_anything_is_written(world: World) -> None:
    from tests.support.victim import make_victim, snapshot

    victim = make_victim(world.tmp / "x")
    before = snapshot(victim)
    _aliased(world, "../x")
    result = world.run("apply")
    assert result.exit_code == 2 and "/models/m/aliases/0: expected an id" in result.output
    assert not world.root.exists() and snapshot(victim) == before


def test_a_model_taking_a_former_alias_name_is_never_fetched_through_the_old_link(world: World) -> None:
    _aliased(world, "next")
    assert world.run("apply").exit_code == 0
    before = world.tree()
    world.models["m"]["aliases"] = []
    world.artifact("next", "n1", {"config.json": b"{}", "x.safetensors": b"other"})
    world.available = ["next"]
    world.write_index()
    result = world.run("apply")
    assert result.exit_code == 0, result.output
    assert (world.root / "models/next").is_dir() and not (world.root / "models/next").is_symlink()
    assert sorted(os.listdir(world.root / "models/m/versions")) == ["v1"]  # nothing landed in the old target
    assert sorted(k for k in world.tree() if k.startswith("models/m/")) == sorted(k for k in before if k.startswith("models/m/"))
    # And a link planted where a model's directory belongs is never written through either.
    world.artifact("other", "o1", {"config.json": b"{}"})
    world.available = ["next", "other"]
    world.write_index()
    os.symlink("m", world.root / "models/other")
    result = world.run("apply")
    assert result.exit_code == 1 and "models/other: is a link, not the artifact's directory" in result.output
    assert sorted(os.listdir(world.root / "models/m/versions")) == ["v1"]


def _training_run(world: World, weights: bytes, name: str = "run") -> Any:
    out = world.tmp / "train" / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_bytes(b"{}")
    (out / "w.safetensors").write_bytes(weights)
    return out


def test_add_file_attaches_typed_provenance_and_update_bumps_only_when_bytes_changed(world: World) -> None:
    world.write_index()
    out = _training_run(world, b"epoch-1")
    prov = world.tmp / "provenance.json"
    prov.write_text(json.dumps({"run": {"id": "r1", "metrics": {"loss": 2.5}}, "dataset": {"id": "org/data"}}))
    result = world.raw("add", f"file:{out}", "--id", "ft", "--version", "1", "--license", "MIT", "--provenance", str(prov),
                       "--tag", "fine-tuned", "--description", "Nightly fine-tune.", "--index", str(world.index))  # fmt: skip
    assert result.exit_code == 0, result.output
    entry = json.loads(world.index.read_text())["models"]["ft"]
    assert entry["provenance"] == {"run": {"id": "r1", "metrics": {"loss": 2.5}}, "dataset": {"id": "org/data"}}
    assert entry["tags"] == ["fine-tuned"] and entry["description"] == "Nightly fine-tune." and entry["version"] == "1"
    before = world.index.read_bytes()
    same = world.raw("add", "--update", "ft", "--index", str(world.index))  # the training job ran, wrote the same bytes
    assert same.exit_code == 2 and "nothing to update" in same.stderr and world.index.read_bytes() == before
    (out / "w.safetensors").write_bytes(b"epoch-2")
    prov.write_text(json.dumps({"run": {"id": "r2", "metrics": {"loss": 1.9}}}))
    bumped = world.raw("add", "--update", "ft", "--provenance", str(prov), "--index", str(world.index), "--json")
    assert bumped.exit_code == 0, bumped.output
    entry = json.loads(world.index.read_text())["models"]["ft"]
    assert entry["version"] == "2" and entry["provenance"] == {"run": {"id": "r2", "metrics": {"loss": 1.9}}}
    assert entry["tags"] == ["fine-tuned"] and entry["source"] == {"type": "file", "path": "train/run"}  # in place
    assert json.loads(bumped.stdout)["version"] == "2"
    (out / "w.safetensors").write_bytes(b"epoch-3")
    reused = world.raw("add", "--update", "ft", "--version", "2", "--index", str(world.index))
    assert reused.exit_code == 2 and "version 2 is already pinned with other files" in reused.stderr
    assert world.run("plan").exit_code == 0  # nothing published: only apply does


@pytest.mark.parametrize(("content", "line"), [
    ("{not json", "provenance.json: not JSON"),
    ("[1]", "provenance.json: expected a JSON object (the entry's provenance), got array"),
    ('{"run": {"metrics": {"loss": "low"}}}', "provenance.json: /run/metrics/loss: expected number, got string"),
])  # fmt: skip
def test_a_bad_provenance_file_is_named_and_changes_nothing(world: World, content: str, line: str) -> None:
    world.write_index()
    out = _training_run(world, b"w")
    prov = world.tmp / "provenance.json"
    prov.write_text(content)
    before = world.index.read_bytes()
    result = world.raw("add", f"file:{out}", "--id", "ft", "--version", "1", "--license", "MIT", "--provenance", str(prov), "--index", str(world.index))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert any(line in err for err in result.stderr.splitlines()), result.stderr
    assert world.index.read_bytes() == before


def test_pin_directory_writes_the_entry_and_returns_it(world: World) -> None:
    import zoo_agent

    world.write_index()
    out = _training_run(world, b"a")
    entry = zoo_agent.pin_directory(out, id="ft", version="7", license="MIT", index=world.index,
                                    provenance={"run": {"metrics": {"acc": 0.9}}}, tags=["nightly"])  # fmt: skip
    assert json.loads(world.index.read_text())["models"]["ft"] == entry
    assert entry["provenance"] == {"run": {"metrics": {"acc": 0.9}}} and entry["version"] == "7"
    with pytest.raises(zoo_agent.UsageError, match="nothing to update"):
        zoo_agent.pin_directory(out, id="ft", index=world.index, update=True)
    (out / "w.safetensors").write_bytes(b"b")
    assert zoo_agent.pin_directory(out, id="ft", index=world.index, update=True)["version"] == "8"
    assert not world.root.exists()  # nothing published


def test_a_provenance_file_that_is_a_fifo_or_endless_is_refused_not_waited_on(world: World) -> None:
    world.write_index()
    out = _training_run(world, b"w")
    fifo = world.tmp / "fifo.json"
    os.mkfifo(fifo)
    for path, why in ((fifo, "is not a regular file"), ("/dev/zero", "is not a regular file")):
        result = world.raw("add", f"file:{out}", "--id", "ft", "--version", "1", "--license", "MIT", "--provenance", str(path), "--index", str(world.index))
        assert result.exit_code == 2 and why in result.stderr, result.output
    big = world.tmp / "big.json"
    big.write_bytes(b'{"a": "' + b"x" * (2 << 20) + b'"}')
    result = world.raw("add", f"file:{out}", "--id", "ft", "--version", "1", "--license", "MIT", "--provenance", str(big), "--index", str(world.index))
    assert result.exit_code == 2 and "larger than 1048576 bytes" in result.stderr
