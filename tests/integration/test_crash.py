"""Crash safety: SIGKILL apply and gc anywhere, check the invariants, converge (issue #3).

Invariant 1 (docs/architecture.md): whatever ``current`` or ``previous`` resolves to is complete
and matches its pins. Invariant 3: after any kill, a rerun converges and leaves no
staging bytes behind. Kill points: random delays, and right after the agent logs each
phase ("fetching", "publishing", "switching", "removing"), read off its own stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.support.world import World

KILLS = int(os.environ.get("ZOO_CRASH_KILLS", "200"))
FILES = {"config.json": 200, "model-1.safetensors": 700_000, "model-2.safetensors": 900_000}
PHASES = ("fetching", "publishing", "switching", "removing")


def _content(version: str, name: str, size: int) -> bytes:
    return random.Random(f"{version}/{name}").randbytes(size)


def _expected(versions: list[str]) -> dict[str, dict[str, str]]:
    return {v: {n: hashlib.sha256(_content(v, n, s)).hexdigest() for n, s in FILES.items()} for v in versions}


def _check_invariants(root: Path, expected: dict[str, dict[str, str]]) -> None:
    base = root / "models" / "m"
    if not base.exists():
        return
    versions = base / "versions"
    for link in ("current", "previous"):
        path = base / link
        if path.is_symlink():
            assert path.resolve().is_dir(), f"{link} dangles: {os.readlink(path)}"
    for vdir in versions.iterdir() if versions.exists() else []:
        if ".tmp." in vdir.name:
            continue  # staging: nobody reads it
        manifest = json.loads((vdir / "manifest.json").read_text())
        assert {f["path"]: f["sha256"] for f in manifest["files"]} == expected[vdir.name]
        for name, digest in expected[vdir.name].items():
            assert hashlib.sha256((vdir / name).read_bytes()).hexdigest() == digest, f"{vdir.name}/{name} is damaged"


@pytest.mark.slow
def test_sigkill_anywhere_keeps_invariants_and_converges(world: World) -> None:
    rng = random.Random(1234)
    versions = [f"v{i:03d}" for i in range(KILLS * 3 // 2 + 1)]
    expected = _expected(versions)
    kills = phase_kills = runs = 0
    for i in range(KILLS * 3):  # until KILLS kills landed mid-run, bounded
        if kills >= KILLS:
            break
        runs += 1
        src = world.source_dir("m", versions[i // 2])
        if not src.exists():  # each version is declared for two runs
            src.mkdir(parents=True)
            for name, size in FILES.items():
                (src / name).write_bytes(_content(versions[i // 2], name, size))
        world.models["m"] = {
            "version": versions[i // 2],
            "source": {"type": "file", "path": f"src/m/{versions[i // 2]}"},
            "files": [{"path": n, "sha256": expected[versions[i // 2]][n], "size": s} for n, s in FILES.items()],
            "license": "MIT",
        }
        world.write_index()
        proc = world.spawn("gc" if i % 5 == 4 else "apply")
        if i % 3 == 0:  # at a phase boundary, read off the agent's own log
            target = rng.choice(PHASES)
            deadline = time.monotonic() + 10
            assert proc.stderr is not None
            while time.monotonic() < deadline:
                line = proc.stderr.readline()
                if not line or target in line:
                    break
            phase_kills += 1
        else:
            time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=30)
        assert proc.returncode in (0, -signal.SIGKILL), f"run {i}: exit {proc.returncode}"
        _check_invariants(world.root, expected)
    final = world.run("apply")
    assert final.exit_code == 0, final.output
    _check_invariants(world.root, expected)
    assert world.current("m") == versions[(runs - 1) // 2]
    leftovers = [p for p in world.root.rglob("*") if ".tmp" in p.name]
    assert leftovers == [], leftovers
    assert kills >= KILLS, f"only {kills} of {runs} runs were killed mid-way"
    print(f"{kills} SIGKILLs ({phase_kills} aimed at phase boundaries) over {runs} runs")
