"""Fetch only what changed: bytes the zoo already holds are reused, not downloaded (issue #23).

Real components: the hub-compatible server on 127.0.0.1 with the real huggingface_hub
client (requests and bytes counted at the server), real reflink/link/copy syscalls on
ext4 and on a tmpfs mounted for the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hubserver import HubServer, Repo, serve
from tests.support.world import World
from zoo_agent.formats import human_bytes

SHARDS = {f"model-{i:05d}-of-00004.safetensors": random.Random(i).randbytes(300_000 + i) for i in range(4)}
V1 = {**SHARDS, "tokenizer.json": b'{"vocab": [1, 2, 3]}' * 50, "config.json": b'{"layers": 2}'}
V2 = {**V1, "config.json": b'{"layers": 2, "rope": 1.0}'}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with serve() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def _hf(world: World, hub: HubServer, version: str, files: dict[str, bytes], aid: str = "m", repo: str = "org/m", kind: str = "models") -> None:
    commit = hub.repos.setdefault(repo, Repo()).commit(files)
    world.artifact(aid, version, files, kind=kind, source={"type": "hf", "repo": repo, "revision": commit})


def _gets(hub: HubServer) -> list[str]:
    return sorted(h.path.rsplit("/", 1)[1] for h in hub.log if h.method == "GET" and "/resolve/" in h.path)


def _log(world: World) -> list[dict[str, object]]:
    return [json.loads(line) for line in (world.root / "host/actions.jsonl").read_text().splitlines()]


def _converged(world: World) -> None:
    """Nothing to do, nothing drifted, every byte right, no staging left."""
    assert world.run("plan").stdout.strip().endswith("nothing to do: the zoo matches the index for host h"), world.run("plan").stdout
    verified = world.run("verify")
    assert verified.exit_code == 0, verified.output
    assert not [p for p in world.root.rglob("*") if ".tmp" in p.name]


def test_a_new_version_fetches_only_the_changed_file(world: World, hub: HubServer) -> None:
    _hf(world, hub, "v1", V1)
    assert world.run("apply").exit_code == 0
    hub.log.clear()
    _hf(world, hub, "v2", V2)
    shared = sum(len(d) for p, d in V2.items() if p != "config.json")
    plan = world.run("plan")
    assert plan.stdout.splitlines()[0] == f"model m v2: would reuse 5 files ({human_bytes(shared)}) from model m v1; would fetch 1 file (26 B)"
    assert hub.log == []  # planning asks nothing of the hub
    result = world.run("apply", "--json")
    assert result.exit_code == 0, result.output
    assert _gets(hub) == ["config.json"]  # one request, for the one file that changed
    assert sum(h.sent for h in hub.log) == len(V2["config.json"])
    fetch = json.loads(result.stdout)["steps"][0]
    assert (fetch["action"], fetch["fetched_bytes"], fetch["reused_bytes"], fetch["bytes"]) == ("fetch", 26, shared, shared + 26)
    assert sum(fetch["reused_files"].values()) == 5
    logged = next(r for r in _log(world) if r["action"] == "fetch" and r["version"] == "v2")
    assert (logged["fetched_bytes"], logged["reused_bytes"]) == (26, shared)
    v2 = world.root / "models/m/versions/v2"
    assert {p: (v2 / p).read_bytes() for p in V2} == V2
    for name in V2:
        assert (v2 / name).stat().st_mode & 0o777 == 0o440  # read-only, in both versions when they share the inode
        assert (world.root / "models/m/versions/v1" / name).stat().st_mode & 0o777 == 0o440
    _converged(world)  # the reused-from version did not turn into "drifted" (its link count moved its ctime)


def test_plan_json_names_each_reused_file_and_its_origin(world: World, hub: HubServer) -> None:
    _hf(world, hub, "v1", V1)
    world.run("apply")
    _hf(world, hub, "v2", V2)
    fetch = json.loads(world.run("plan", "--json").stdout)["steps"][0]
    assert fetch["fetch_bytes"] == 26 and len(fetch["reuse"]) == 5
    assert fetch["reuse"][0]["from"] == {"kind": "models", "id": "m", "version": "v1", "path": fetch["reuse"][0]["path"]}


def test_reuse_across_models_and_adapters(world: World) -> None:
    """An adapter shipping the base model's tokenizer under another name takes it from the model."""
    tokenizer = random.Random(7).randbytes(40_000)
    world.artifact("m", "v1", {"tokenizer.json": tokenizer, "w.safetensors": b"w" * 1000})
    assert world.run("apply").exit_code == 0
    world.artifact("lo", "r1", {"tok/tokenizer.json": tokenizer, "adapter.safetensors": b"a" * 100}, kind="loras")
    assert "lora lo r1: would reuse 1 file (40.0 kB) from model m v1; would fetch 1 file (100 B)" in world.run("plan").stdout
    (world.source_dir("lo", "r1") / "tok/tokenizer.json").unlink()  # the source need not have it any more
    result = world.run("apply")
    assert result.exit_code == 0, result.output
    assert (world.root / "loras/lo/current/tok/tokenizer.json").read_bytes() == tokenizer
    _converged(world)


def test_a_drifted_origin_is_not_reused(world: World, hub: HubServer) -> None:
    _hf(world, hub, "v1", V1)
    world.run("apply")
    shard = next(iter(SHARDS))
    os.utime(world.root / "models/m/versions/v1" / shard, ns=(1, 1))  # stat no longer matches the manifest
    _hf(world, hub, "v2", V2)
    assert "would reuse 4 files" in world.run("plan").stdout
    hub.log.clear()
    result = world.run("apply")
    assert result.exit_code == 0, result.output
    assert _gets(hub) == sorted(["config.json", shard])
    _converged(world)  # and v1 was re-verified on the way


def test_an_origin_that_drifts_after_the_plan_is_fetched_instead(world: World, hub: HubServer) -> None:
    """The store checks the origin's stat again right before it links it."""
    from zoo_agent.index.model import FileEntry
    from zoo_agent.store import zoo as store
    from zoo_agent.store.reuse import reuse_file

    _hf(world, hub, "v1", V1)
    world.run("apply")
    zoo = store.Zoo(world.root)
    v1 = zoo.version_dir("models", "m", "v1")
    record = next(f for f in store.read_manifest(v1)["files"] if f["path"] == "tokenizer.json")  # type: ignore[index]
    os.utime(v1 / "tokenizer.json", ns=(5, 5))
    staging = zoo.new_staging("models", "m", "v2")
    entry = FileEntry(path="tokenizer.json", sha256=record["sha256"], size=record["size"])
    assert reuse_file(zoo, staging, entry, v1, record, {}) is None
    assert not (staging / "tokenizer.json").exists()
    zoo.abandon(staging)


def test_sigkill_while_reusing_converges(world: World, hub: HubServer) -> None:
    _hf(world, hub, "v1", V1)
    world.run("apply")
    _hf(world, hub, "v2", {**V2, "config.json": b"c" * 20_000})
    hub.faults.pause_at["config.json"] = 10_000  # every reuse is done; the one fetch hangs half-way
    proc = world.spawn("apply", "--jobs", "1")
    try:
        assert hub.faults.paused.wait(timeout=30)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate()
        hub.faults.resume.set()
    staging = [p for p in (world.root / "models/m/versions").iterdir() if ".tmp." in p.name]
    assert len(staging) == 1 and (staging[0] / "tokenizer.json").stat().st_nlink >= 2  # killed with links in staging
    assert world.run("plan").stdout.count("would re-verify") == 0  # v1's records were refreshed before the kill
    hub.log.clear()
    result = world.run("apply")
    assert result.exit_code == 0, result.output
    assert _gets(hub) == ["config.json"]
    _converged(world)


@pytest.mark.parametrize("seed", range(6))
def test_sigkill_at_random_points_converges(world: World, seed: int) -> None:
    big = {f"s{i}": random.Random(i).randbytes(200_000) for i in range(30)}
    world.artifact("m", "v1", big)
    world.run("apply")
    world.artifact("m", "v2", {**big, "config.json": b"{}"})
    proc = world.spawn("apply", "--jobs", "1")
    time.sleep(random.Random(seed).uniform(0.3, 1.2))  # the interpreter starts in ~0.3 s; reuse takes a few ms
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    result = world.run("apply")
    assert result.exit_code == 0, result.output
    _converged(world)


def test_gc_of_the_older_version_keeps_the_newer_intact(world: World, hub: HubServer) -> None:
    world.keep_versions = 1
    _hf(world, hub, "v1", V1)
    world.run("apply")
    _hf(world, hub, "v2", V2)
    world.run("apply")
    own = len(V1["config.json"]) + (world.root / "models/m/versions/v1/manifest.json").stat().st_size
    result = world.run("gc", "--json")
    assert result.exit_code == 0, result.output
    removed = next(s for s in json.loads(result.stdout)["steps"] if s["action"] == "remove")
    assert removed["bytes"] == own  # the shared bytes stay with v2: only v1's own files are freed
    assert sorted(os.listdir(world.root / "models/m/versions")) == ["v2"]
    v2 = world.root / "models/m/versions/v2"
    assert {p: (v2 / p).read_bytes() for p in V2} == V2
    assert all((v2 / p).stat().st_nlink == 1 for p in V2)
    _converged(world)  # v2 is not re-verified: gc brought its records up to date


def test_a_damaged_shared_file_is_found_in_both_versions_and_repaired(world: World, hub: HubServer) -> None:
    _hf(world, hub, "v1", V1)
    world.run("apply")
    _hf(world, hub, "v2", V2)
    world.run("apply")
    shard = next(iter(SHARDS))
    target = world.root / "models/m/versions/v2" / shard
    if target.stat().st_nlink < 2:
        pytest.skip("this filesystem gave no hard link (reflinks: the versions share no inode)")
    target.chmod(0o640)
    with open(target, "r+b") as f:  # one bit flipped in place, as a failing disk would
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    result = world.run("verify", "--json")
    assert result.exit_code == 1
    bad = sorted((f["version"], f["path"]) for f in json.loads(result.stdout)["findings"])
    assert bad == [("v1", shard), ("v2", shard)]
    repaired = world.run("verify", "--repair", "--json")
    assert repaired.exit_code == 0, repaired.output
    assert sorted(json.loads(repaired.stdout)["repaired"]) == ["models/m/v1", "models/m/v2"]
    for version, files in (("v1", V1), ("v2", V2)):
        vdir = world.root / "models/m/versions" / version
        assert {p: (vdir / p).read_bytes() for p in files} == files
    assert (world.current("m"), os.readlink(world.root / "models/m/previous")) == ("v2", "versions/v1")
    _converged(world)


def test_offline_reuses_and_still_reports_what_only_the_network_has(world: World, hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    _hf(world, hub, "v1", V1)
    world.run("apply")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.log.clear()
    _hf(world, hub, "v3", V1)  # the same files under a new label: everything is in the zoo
    result = world.run("apply")
    assert result.exit_code == 0, result.output
    _hf(world, hub, "v4", V2)
    result = world.run("apply")
    assert result.exit_code == 1
    assert "config.json: missing from the zoo, and offline mode" in result.stderr
    assert hub.log == []
    assert world.current("m") == "v3"


@contextlib.contextmanager
def _tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _methods(world: World, version: str) -> dict[str, int]:
    record = next(r for r in _log(world) if r["action"] == "fetch" and r["version"] == version)
    return dict(record["reused_files"])  # type: ignore[call-overload]


def test_on_tmpfs_the_hard_link_path_is_taken(world: World) -> None:
    """tmpfs has no reflinks (FICLONE fails): the store falls back to a hard link."""
    with _tmpfs(world.root):
        world.artifact("m", "v1", {"a": b"a" * 5000, "b": b"b" * 10})
        assert world.run("apply").exit_code == 0
        world.artifact("m", "v2", {"a": b"a" * 5000, "b": b"B" * 10})
        assert world.run("apply").exit_code == 0
        assert _methods(world, "v2") == {"hardlink": 1}
        assert (world.root / "models/m/versions/v2/a").stat().st_ino == (world.root / "models/m/versions/v1/a").stat().st_ino
        _converged(world)


def test_one_inode_is_linked_into_at_most_max_links_versions(world: World) -> None:
    """Each link moves every sharer's ctime (a manifest rewrite each): past MAX_LINKS the bytes
    are copied, so many versions of the same file cost linear work, not quadratic."""
    from zoo_agent.store.reuse import MAX_LINKS

    with _tmpfs(world.root):
        world.available = [f"m{i}" for i in range(MAX_LINKS + 3)]  # all on this host
        for i in range(MAX_LINKS + 3):
            world.artifact(f"m{i}", "v1", {"a": b"a" * 5000, "own": str(i).encode()})
        result = world.run("apply")
        assert result.exit_code == 0, result.output
        links = [(world.root / f"models/m{i}/versions/v1/a").stat().st_nlink for i in range(MAX_LINKS + 3)]
        assert max(links) == MAX_LINKS and links.count(1) >= 1, links  # the rest were copied
        _converged(world)


def test_an_origin_on_another_device_is_copied(world: World) -> None:
    """No reflink and no link across filesystems: a local copy, hashed as it is written."""
    with _tmpfs(world.root / "models/other"):
        world.available = ["other"]
        world.artifact("other", "o1", {"tok": b"t" * 5000})
        assert world.run("apply").exit_code == 0
        world.artifact("m", "v1", {"tok": b"t" * 5000, "w": b"w"})
        (world.source_dir("m", "v1") / "tok").unlink()
        assert world.run("apply").exit_code == 0
        assert _methods(world, "v1") == {"copy": 1}
        assert (world.root / "models/m/current/tok").read_bytes() == b"t" * 5000
        _converged(world)


def test_a_backup_with_models_keeps_one_copy_of_shared_bytes(world: World, tmp_path: Path) -> None:
    shard = random.Random(3).randbytes(100_000)
    world.artifact("m", "v1", {"w": shard, "c": b"1"})
    world.run("apply")
    world.artifact("m", "v2", {"w": shard, "c": b"2"})
    world.run("apply")
    if (world.root / "models/m/versions/v2/w").stat().st_nlink < 2:
        pytest.skip("this filesystem gave no hard link")
    result = world.run("backup", "--to", str(tmp_path / "bk"), "--include-models", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bytes_written"] < 2 * len(shard)  # the shared shard was written once
    copies = [tmp_path / "bk/files/models/m/versions" / v / "w" for v in ("v1", "v2")]
    assert copies[0].stat().st_ino == copies[1].stat().st_ino and copies[0].read_bytes() == shard
    again = world.run("backup", "--to", str(tmp_path / "bk"), "--include-models", "--json")
    assert json.loads(again.stdout)["bytes_written"] == 0  # incremental: nothing changed
    shutil.rmtree(world.root)
    restored = world.run("restore", "--from", str(tmp_path / "bk"))
    assert restored.exit_code == 0, restored.output
    assert (world.root / "models/m/versions/v1/w").read_bytes() == shard
    assert world.run("apply").exit_code == 0  # restored files are new inodes: re-verified once, as before
    _converged(world)


def test_strict_rehashes_an_origin_whose_bytes_rotted_under_an_unchanged_stat(world: World, hub: HubServer) -> None:
    _hf(world, hub, "v1", V1)
    world.run("apply")
    v1 = world.root / "models/m/versions/v1"
    shard = next(iter(SHARDS))
    (v1 / shard).chmod(0o640)
    with open(v1 / shard, "r+b") as f:
        f.write(b"\0")
    (v1 / shard).chmod(0o440)
    manifest = json.loads((v1 / "manifest.json").read_text())  # as if the disk flipped it: the stat still matches
    st = (v1 / shard).stat()
    for record in manifest["files"]:
        if record["path"] == shard:
            record.update(mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns)
    (v1 / "manifest.json").chmod(0o640)
    (v1 / "manifest.json").write_text(json.dumps(manifest))
    (v1 / "manifest.json").chmod(0o440)
    _hf(world, hub, "v2", V2)
    hub.log.clear()
    result = world.run("apply", "--strict")
    assert result.exit_code == 0, result.output
    assert _gets(hub) == sorted(["config.json", shard])  # the rotten origin was not reused
    assert (world.root / "models/m/versions/v2" / shard).read_bytes() == SHARDS[shard]
    assert "its bytes no longer match its manifest; run: zoo-agent verify" in result.stderr
