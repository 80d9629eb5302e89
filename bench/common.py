"""Helpers shared by the benchmarks: timing, subprocesses, random files, the table."""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

AGENT = [sys.executable, "-m", "zoo_agent"]
MB = 1 << 20


def timed(fn: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def run(*cmd: str | Path, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, **kw)  # type: ignore[call-overload,no-any-return]


def write_random(path: Path, size: int) -> str:
    """A file of pseudo-random bytes (incompressible), and its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest, block = hashlib.sha256(), os.urandom(MB)
    with open(path, "wb") as f:
        for i in range(size // MB):
            chunk = block[i % 997:] + block[: i % 997]
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def seconds(value: float) -> str:
    """Seconds for the table: milliseconds below one second, so short operations stay readable."""
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def table(rows: list[dict[str, object]]) -> str:
    lines = [f"{'benchmark':<52} {'ours':>10} {'peer':<24} {'peer time':>10} {'ratio':>7}  goal", "-" * 120]
    for r in rows:
        ours = f"{r['ours_mb']:.0f} MB" if r.get("ours_mb") is not None else seconds(float(r["ours_s"]))  # type: ignore[arg-type]
        peer_s = seconds(float(r["peer_s"])) if r["peer_s"] is not None else "-"  # type: ignore[arg-type]
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        lines.append(f"{r['name']:<52} {ours:>10} {r['peer']:<24} {peer_s:>10} {ratio:>7}  {r['goal']}")
    return "\n".join(lines)
