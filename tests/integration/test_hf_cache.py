"""`zoo-agent export hf-cache DIR` (issue #35): the zoo's hub-sourced versions where other tools
look, as links to its verified read-only files; transformers loads them by repository id offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support.hubserver import HubServer, Repo, serve
from tests.support.victim import make_victim, snapshot
from tests.support.world import World

pytest.importorskip("transformers", reason="the resident extra is not installed (pip install -e .[resident])")

pytestmark = pytest.mark.resident


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with serve() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    from zoo_agent.demo.tiny import build_tiny_model

    out = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _published(world: World, hub: HubServer, tiny: dict[str, bytes]) -> str:
    commit = hub.repos.setdefault("org/tiny", Repo()).commit(tiny)
    world.artifact("m", "v1", tiny, source={"type": "hf", "repo": "org/tiny", "revision": commit})
    result = world.run("apply")
    assert result.exit_code == 0, result.output
    return commit


_LOAD = """
import hashlib, json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
def digest(model):
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode()); h.update(tensor.float().numpy().tobytes())
    return h.hexdigest()
by_id = AutoModelForCausalLM.from_pretrained("org/tiny", local_files_only=True)
tok = AutoTokenizer.from_pretrained("org/tiny", local_files_only=True)
direct = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True)
ids = tok("Hello", return_tensors="pt").input_ids
out = by_id.generate(ids, max_new_tokens=3, do_sample=False)
print(json.dumps({"same": digest(by_id) == digest(direct), "new_tokens": out.shape[1] - ids.shape[1]}))
"""


def test_transformers_loads_a_zoo_model_by_repo_id_offline_through_the_view(world: World, hub: HubServer, tiny: dict[str, bytes]) -> None:
    commit = _published(world, hub, tiny)
    view = world.tmp / "hf-cache"
    result = world.raw("export", "hf-cache", str(view), "--root", str(world.root), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["repos"] == [{"repo": "org/tiny", "revision": commit, "artifact": "models/m@v1", "files": len(tiny)}]
    folder = view / "models--org--tiny"
    assert (folder / "refs/main").read_text() == commit
    version = world.root.resolve() / "models/m/versions/v1"
    for name in tiny:  # links, never copies, to the zoo's read-only files of that version
        link = folder / "snapshots" / commit / name
        assert link.is_symlink() and os.readlink(link) == str(version / name)
        assert oct(link.stat().st_mode & 0o777) == "0o440"
    regular = [p for p in view.rglob("*") if p.is_file() and not p.is_symlink()]
    assert sorted(str(p.relative_to(view)) for p in regular) == [".zoo-hf-cache.json", "models--org--tiny/refs/main"]
    hub.repos.clear()  # nothing may be asked of the hub: offline, and the repository is gone anyway
    env = {**os.environ, "HF_HUB_CACHE": str(view), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-c", _LOAD, str(version)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"same": True, "new_tokens": 3}
    before = folder.stat().st_ino
    assert world.raw("export", "hf-cache", str(view), "--root", str(world.root)).exit_code == 0
    assert folder.stat().st_ino == before  # nothing changed: the folder is left as it was


def test_the_view_follows_the_zoo_and_never_touches_what_it_did_not_make(world: World, hub: HubServer, tiny: dict[str, bytes]) -> None:
    commit = _published(world, hub, tiny)
    view = world.tmp / "hf-cache"
    foreign = make_victim(view / "models--org--other")  # someone's real cache entry beside ours
    before = snapshot(foreign)
    assert world.raw("export", "hf-cache", str(view), "--root", str(world.root)).exit_code == 0
    # A drifted file: its version no longer verifies, so the view drops it rather than serve it.
    damaged = world.root / "models/m/versions/v1/config.json"
    os.chmod(damaged, 0o640)
    damaged.write_bytes(damaged.read_bytes() + b" ")
    result = world.raw("export", "hf-cache", str(view), "--root", str(world.root))
    assert result.exit_code == 1 and "since it was verified; run: zoo-agent verify m" in result.stderr
    assert not (view / "models--org--tiny").exists() and snapshot(foreign) == before
    # Our folder name taken by someone else's directory: left as it is, said so.
    assert world.run("verify", "--repair").exit_code == 0
    taken = make_victim(view / "models--org--tiny")
    taken_before = snapshot(taken)
    result = world.raw("export", "hf-cache", str(view), "--root", str(world.root))
    assert result.exit_code == 1 and "models--org--tiny: exists and this export did not make it" in result.stderr
    assert snapshot(taken) == taken_before and snapshot(foreign) == before
    # The view never lives inside the zoo (it would put links among the zoo's own files).
    before_zoo = world.tree()
    inside = world.raw("export", "hf-cache", str(world.root / "host" / "view"), "--root", str(world.root))
    assert inside.exit_code == 2 and "is inside the zoo" in inside.stderr and world.tree() == before_zoo
    assert commit


def test_a_tampered_manifest_never_links_outside_the_version(world: World, hub: HubServer, tiny: dict[str, bytes]) -> None:
    _published(world, hub, tiny)
    victim = make_victim(world.tmp / "victim")
    before = snapshot(victim)
    manifest_path = world.root / "models/m/versions/v1/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"].append({**manifest["files"][0], "path": "../../../../../victim/precious.txt"})
    os.chmod(manifest_path, 0o640)
    manifest_path.write_text(json.dumps(manifest))
    view = world.tmp / "hf-cache"
    result = world.raw("export", "hf-cache", str(view), "--root", str(world.root))
    assert result.exit_code == 1 and "does not say which hub repository, commit and files it holds" in result.stderr
    assert not (view / "models--org--tiny").exists() and snapshot(victim) == before
    assert [p for p in view.rglob("*") if p.is_symlink()] == []
