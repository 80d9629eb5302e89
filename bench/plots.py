#!/usr/bin/env python3
"""PNG plots of the benchmark JSON files, for docs/performance.md next to the table (issue #25).

    .venv/bin/python bench/plots.py            # from bench/*.json as they are (measures nothing)
    .venv/bin/python bench/run --from-json     # the table, then these plots, measuring nothing

Writes docs/plots/throughput.png (aggregate tok/s vs clients: ours batched, ours one at a
time, the peer), ttft.png (TTFT p50/p99 vs clients) and fetch.png (fetch and verify time
of the hub and loopback fetches: ours vs each peer). A plot whose JSON file is missing is
left out, saying so. matplotlib is not a dependency of the project: without it the plots
are skipped with one line naming the install command, and the table is unaffected.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODES = {"batched": "ours, batched", "serial": "ours, one at a time", "peer": "peer (transformers serve)"}


def _load(name: str, directory: Path) -> dict[str, Any] | None:
    path = directory / f"{name}.json"
    if not path.is_file():
        print(f"bench/plots.py: no {path}; its plot is left out", file=sys.stderr)
        return None
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def _levels(section: dict[str, Any]) -> dict[str, tuple[list[int], list[dict[str, float]]]]:
    out = {}
    for mode, by_clients in section.items():
        clients = sorted(by_clients, key=int)
        out[mode] = ([int(c) for c in clients], [by_clients[c] for c in clients])
    return out


def throughput(plt: Any, batching: dict[str, Any], out: Path) -> Path:
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, (clients, runs) in _levels(batching["measured"]).items():
        ax.plot(clients, [r["tps"] for r in runs], marker="o", label=MODES.get(mode, mode))
    ax.set(xlabel="concurrent clients", ylabel="aggregate tokens/s", title="Throughput vs clients (Qwen2-0.5B shape, CPU)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({int(c) for m in batching["measured"].values() for c in m}))
    ax.get_xaxis().set_major_formatter(ScalarFormatter())
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(plt, fig, out / "throughput.png")


def ttft(plt: Any, batching: dict[str, Any], out: Path) -> Path:
    sections = [(key, title) for key, title in (("measured", "Qwen2-0.5B shape"), ("ttft", "tiny model")) if key in batching]
    fig, axes = plt.subplots(1, len(sections), figsize=(6 * len(sections), 4.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], sections):
        for mode, (clients, runs) in _levels(batching[key]).items():
            line = ax.plot(clients, [r["ttft_p50"] for r in runs], marker="o", label=f"{MODES.get(mode, mode)} p50")[0]
            ax.plot(clients, [r["ttft_p99"] for r in runs], marker="x", linestyle="--", color=line.get_color(), label=f"{MODES.get(mode, mode)} p99")
        ax.set(xlabel="concurrent clients", ylabel="time to first token (s)", title=f"TTFT percentiles ({title})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return _save(plt, fig, out / "ttft.png")


def fetch(plt: Any, documents: dict[str, dict[str, Any]], out: Path) -> Path | None:
    """Seconds to fetch (and verify, fsync) N MB: ours and each peer, grouped by benchmark and size."""
    bars: list[tuple[str, str, float]] = []  # (group, who, seconds)
    for name, doc in documents.items():
        seen = set()
        for row in doc["rows"]:
            size = re.search(r"(\d+) MB", row["name"])
            if "fetch" not in row["name"] or size is None or row.get("ours_s") is None:
                continue
            group = f"{name}: {row['name'].split(' (')[0]}"
            if group not in seen:
                bars.append((group, "zoo-agent", row["ours_s"]))
                seen.add(group)
            if row.get("peer_s") is not None:
                bars.append((group, row["peer"], row["peer_s"]))
    if not bars:
        print("bench/plots.py: no fetch rows in hf.json or store.json; fetch.png is left out", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(bars) + 1.5))
    labels = [f"{who}  [{group}]" for group, who, _ in bars]
    colors = ["tab:blue" if who == "zoo-agent" else "tab:gray" for _, who, _ in bars]
    ax.barh(range(len(bars)), [s for _, _, s in bars], color=colors)
    ax.set_yticks(range(len(bars)), labels=labels, fontsize="small")
    ax.invert_yaxis()
    for i, (_, _, seconds) in enumerate(bars):
        ax.text(seconds, i, f" {seconds:.1f} s", va="center", fontsize="small")
    ax.set_xlim(0, max(s for _, _, s in bars) * 1.15)  # room for the labels
    ax.set(xlabel="seconds (less is better)", title="Fetch time by size: ours (blue) vs peers")
    ax.grid(True, axis="x", alpha=0.3)
    return _save(plt, fig, out / "fetch.png")


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version string: the same JSON gives the same bytes
    plt.close(fig)
    return path


def main(argv: list[str] | None = None, directory: Path = HERE) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-json", action="store_true", help="accepted for symmetry with bench/run: plots never measure")
    parser.add_argument("--out", type=Path, default=directory.parent / "docs" / "plots", help="where the PNG files go (default: docs/plots)")
    args = parser.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        print("bench/plots.py: matplotlib is not installed, so no plots (pip install matplotlib; the table is unaffected)", file=sys.stderr)
        return 0
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    written: list[Path | None] = []
    if (batching := _load("batching", directory)) is not None:
        written += [throughput(plt, batching, args.out), ttft(plt, batching, args.out)]
    fetches = {name: doc for name in ("hf", "store") if (doc := _load(name, directory)) is not None}
    written.append(fetch(plt, fetches, args.out))
    for path in written:
        if path is not None:
            print(f"wrote {path.relative_to(directory.parent) if path.is_relative_to(directory.parent) else path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
