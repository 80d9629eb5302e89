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


def figure(r: dict[str, object], side: str) -> str:
    """One side of a row ('ours' or 'peer'): a time, a size or a rate."""
    if r.get(f"{side}_text") is not None:
        return str(r[f"{side}_text"])
    if r.get(f"{side}_mb") is not None:
        return f"{float(r[f'{side}_mb']):.0f} MB"  # type: ignore[arg-type]
    return seconds(float(r[f"{side}_s"])) if r.get(f"{side}_s") is not None else "-"  # type: ignore[arg-type]


def markdown(rows: list[dict[str, object]]) -> str:
    lines = ["| benchmark | ours | peer (same run) | peer's figure | ratio | goal |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "-"
        lines.append(f"| {r['name']} | {figure(r, 'ours')} | {str(r['peer']).replace('|', chr(92) + '|')} | {figure(r, 'peer')} | {ratio} | {r['goal']} |")
    return "\n".join(lines)


def table(rows: list[dict[str, object]]) -> str:
    """Ours, the peer's figure from the same run, the ratio, the goal: a time, a size or a rate each."""

    width = max([52, *(len(str(r["name"])) for r in rows)])
    lines = [f"{'benchmark':<{width}} {'ours':>10} {'peer':<30} {'peer figure':>11} {'ratio':>7}  goal", "-" * (width + 80)]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "-"
        lines.append(f"{r['name']:<{width}} {figure(r, 'ours'):>10} {str(r['peer']):<30} {figure(r, 'peer'):>11} {ratio:>7}  {r['goal']}")
    return "\n".join(lines)
