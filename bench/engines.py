"""llama.cpp against our transformers tenant on the same weights (issue #33), in one run, ratios.

    .venv/bin/python bench/engines.py [--shape qwen2-0.5b|tiny] [--only throughput,pagein,rotation] [--json bench/engines.json]

One model (the tests' tiny transformers model, or its Qwen2-0.5B shape with random weights),
converted to GGUF at f32 by the pinned llama.cpp source's converter (token for token the same
greedy output as transformers) and quantized by its ``llama-quantize`` to q8_0 and q4_k_m: the
same weights in four files. Every server is a resident of ours; the peer of each row is measured
in the same run, asked in turn with ours (never at once: on 2 cores they would measure each
other), so a change of the machine's load falls on both. Each row names the machine's load
average during its part, and the spread of the rounds.

1. throughput: one resident, four tenants (transformers f32; llama.cpp f32, q8_0, q4_k_m; no
   budget: all loaded), aggregate tokens/s at 1 and 8 clients of streamed chat requests, greedy,
   ``--tokens`` each (``ignore_eos``; usage counts them). Each of ``--rounds`` rounds asks the
   four in turn, the order rotated by one each round; a row is the medians and the median of
   the rounds' ratios (llama.cpp / transformers).
2. page-in: request -> first streamed token of a paged-out tenant (two tenants of one file, a
   budget for one, the other loaded), as ``bench/paging.py``'s cold start: llama.cpp q4_k_m,
   llama.cpp f32 and transformers f32, one resident each, all up, asked in turn, ``--reps``
   each. Every file was loaded before (by the warm-up and the previous repetitions): it is in
   the page cache, as for a tenant evicted minutes ago.
3. rotation: five llama.cpp q4_k_m tenants with a budget for two (2.5 footprints),
   ``--rotation-rounds`` of ``bench/paging.py``'s skewed sequence, LRU: requests/s, loads and
   the peak RSS of the resident's process tree against the budget plus the slack (the router's
   RSS and, per live worker, its RSS beyond its footprint), against five transformers f32
   tenants of the same weights on the same sequence.

Everything is on 127.0.0.1 and unix sockets; every loop is bounded by a count and a deadline;
residents get SIGTERM, then SIGKILL of their process group, in ``finally`` blocks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import paging  # noqa: E402
from common import MB, Resident, seconds, table  # noqa: E402
from llamacpp import level  # noqa: E402

from tests.support.llamacpp import find_llama_cpp  # noqa: E402

QUANTS = ("f32", "q8_0", "q4_k_m")
LEVELS = (1, 8)
MAX_CONTEXT = 512


def load() -> float:
    return os.getloadavg()[0]


def spread(xs: list[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}"


def model_entry(src: Path, gguf: bool) -> dict[str, Any]:
    files = [{"path": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size} for p in sorted(src.iterdir())]
    return {"version": "v1", "source": {"type": "file", "path": str(src)}, "license": "MIT", "files": files, **({"format": "gguf"} if gguf else {})}


def tenant(model: str, gguf: bool, tokens: int, max_batch: int) -> dict[str, Any]:
    resources: dict[str, Any] = {"max_batch": max_batch, "max_queue": 64, "max_context": MAX_CONTEXT}
    return {"model": model, "generation": {"temperature": 0, "max_tokens": tokens}, "resources": resources,
            **({"backend": "llama.cpp"} if gguf else {})}  # fmt: skip


def build(work: Path, shape: str) -> dict[str, Path]:
    """{"hf": the transformers model's directory, "f32" / "q8_0" / "q4_k_m": a directory holding that GGUF file}."""
    from zoo_agent.demo.tiny import QWEN2_05B_SHAPE, build_tiny_model

    llama = find_llama_cpp()
    if llama is None:
        raise SystemExit("llama.cpp is not built: bash .ci/llama-cpp")
    out = {"hf": build_tiny_model(work / "src" / "hf", **(QWEN2_05B_SHAPE if shape == "qwen2-0.5b" else {}))}  # type: ignore[arg-type]
    for q in QUANTS:
        (work / "src" / q).mkdir(parents=True)
        out[q] = work / "src" / q
    f32 = llama.convert(out["hf"], out["f32"] / "m-f32.gguf", "f32")
    for q in ("q8_0", "q4_k_m"):
        llama.quantize(f32, out[q] / f"m-{q}.gguf", q)
    return out


class Zoo(paging.Zoo):
    """bench/paging.py's zoo, its tenants served by llama.cpp where the model is a GGUF file."""

    def __init__(self, work: Path, src: Path, gguf: bool) -> None:
        work.mkdir(parents=True, exist_ok=True)
        super().__init__(work, src)
        self.gguf = gguf
        self.model = model_entry(src, gguf)

    def index(self, name: str, tenants: list[str], budget: int | None) -> Path:
        path = super().index(name, tenants, budget)
        doc = json.loads(path.read_text())
        if self.gguf:
            for t in doc["tenants"].values():
                t["backend"] = "llama.cpp"
                t["resources"]["max_context"] = MAX_CONTEXT
        path.write_text(json.dumps(doc))
        return path


class Client:
    """What ``llamacpp.level`` asks of a server: a client of its own per caller."""

    def __init__(self, url: str) -> None:
        self.url = url

    def client(self) -> Any:
        import httpx

        return httpx.Client(base_url=self.url, timeout=600)


def throughput(work: Path, src: dict[str, Path], tokens: int, rounds: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Four tenants of one resident in turn: {tenant: {clients: [tok/s per round]}}."""
    names = {"hf": "transformers f32", **{q: f"llama.cpp {q}" for q in QUANTS}}
    index = work / "throughput.json"
    index.write_text(json.dumps({
        "models": {k: model_entry(d, k != "hf") for k, d in src.items()},
        "tenants": {k: tenant(k, k != "hf", tokens, 16) for k in src},
        "hosts": {"h": {"tenants": list(src)}}}))  # fmt: skip
    Zoo(work, src["hf"], False).apply(index)
    samples: dict[str, dict[int, list[float]]] = {k: {n: [] for n in LEVELS} for k in src}
    loads: list[float] = []
    r = Resident(work, index)
    try:
        r.wait_ready()
        server = Client(r.url)
        for k in src:  # warm: every tenant loaded and its weights paged in
            level(server, 1, 4, k, 1)
        order = list(src)
        for clients in LEVELS:
            for i in range(rounds):
                loads.append(load())
                for k in order[i % len(order):] + order[: i % len(order)]:
                    samples[k][clients].append(level(server, clients, tokens, k, per_client=2 if clients == 1 else 1)["tps"])
                shown = {k: round(v[clients][-1], 1) for k, v in samples.items()}
                print(f"    throughput, {clients} client(s), round {i + 1}/{rounds}: {shown} tok/s (load {loads[-1]:.1f})", file=sys.stderr, flush=True)
    finally:
        r.stop()
    rows = []
    where = f"median of {rounds}, load {min(loads):.1f}-{max(loads):.1f}"
    for clients in LEVELS:
        base = samples["hf"][clients]
        for q in QUANTS:
            ratios = [o / p for o, p in zip(samples[q][clients], base, strict=True)]
            rows.append({"name": f"{clients} client(s): aggregate tok/s, {names[q]} vs transformers f32, same weights ({where}; ratios {spread(ratios)})",
                         "ours_text": f"{statistics.median(samples[q][clients]):.1f} tok/s", "peer": "transformers tenant (f32)",
                         "peer_text": f"{statistics.median(base):.1f} tok/s", "ratio": statistics.median(ratios), "goal": "- (which engine)"})  # fmt: skip
    return rows, {"tok_s": samples, "load": loads}


def page_in(work: Path, src: dict[str, Path], reps: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Request -> first token of the paged-out one of two tenants, three residents asked in turn."""
    import httpx

    kinds = {"q4_k_m": "llama.cpp q4_k_m", "f32": "llama.cpp f32", "hf": "transformers f32"}
    zoos = {k: Zoo(work / f"pagein-{k}", src[k], k != "hf") for k in kinds}
    residents: dict[str, Resident] = {}
    took: dict[str, list[float]] = {k: [] for k in kinds}
    loads: list[float] = []
    footprints: dict[str, int] = {}
    try:
        for k, zoo in zoos.items():
            five = zoo.index("five", list("abcde"), None)
            zoo.apply(five)
            fp = zoo.estimate(five, "a")
            residents[k] = Resident(zoo.work, zoo.index("pair", ["a", "b"], int(fp * 1.5)))
            residents[k].wait_ready()
        with httpx.Client() as http:
            for k, zoo in zoos.items():  # warm: both tenants' files loaded once (the page cache holds them)
                for t in "ba":
                    paging.first_token(http, residents[k].url, t)
            for i in range(reps):
                loads.append(load())
                tenant = "ab"[(i + 1) % 2]  # the one not loaded: b, a, b, ...
                for k in list(kinds)[i % 3:] + list(kinds)[: i % 3]:
                    since = len(zoos[k].actions())
                    took[k].append(paging.first_token(http, residents[k].url, tenant))
                    if ("page-in", tenant) not in zoos[k].paged(since):
                        raise RuntimeError(f"{k}: {tenant} was not paged in: not a page-in ({zoos[k].paged(since)})")
                shown = {k: round(v[-1], 2) for k, v in took.items()}
                print(f"    page-in {i + 1}/{reps}: {shown} s (load {loads[-1]:.1f})", file=sys.stderr, flush=True)
        for k, zoo in zoos.items():
            footprints[k] = int(zoo.info("ab"[reps % 2])["footprint"]["used"])
    finally:
        for r in residents.values():
            r.stop()
    rows = []
    where = f"median of {reps}, load {min(loads):.1f}-{max(loads):.1f}"
    base = took["hf"]
    for k in ("q4_k_m", "f32"):
        ratios = [p / o for o, p in zip(took[k], base, strict=True)]
        ours = statistics.median(took[k])
        row = {"name": f"page-in: first token of a paged-out tenant, {kinds[k]} vs transformers f32 ({where}; ratios {spread(ratios)})",
               "ours_s": ours, "peer": "transformers tenant (f32)", "peer_s": statistics.median(base), "ratio": statistics.median(ratios),
               "goal": "<= 1 s (q4_k_m, file in the page cache)" if k == "q4_k_m" else "-"}  # fmt: skip
        if k == "q4_k_m" and ours > 1:
            row["notes"] = f"goal missed: {ours:.2f} s"
        rows.append(row)
    return rows, {"seconds": took, "load": loads, "footprints": footprints}


def rotation(work: Path, src: dict[str, Path], rounds: int, footprints: dict[str, int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """bench/paging.py's rotation, five llama.cpp q4_k_m tenants against five transformers f32 ones."""
    out: dict[str, Any] = {}
    for k in ("q4_k_m", "hf"):
        zoo = Zoo(work / f"rotation-{k}", src[k], k != "hf")
        five = zoo.index("five", list("abcde"), None)
        zoo.apply(five)
        fp = max(zoo.estimate(five, "a"), footprints.get(k, 0))
        before = load()
        out[k] = paging.rotation(zoo, fp, rounds, "lru")
        out[k]["load"] = [before, load()]
    q, t = out["q4_k_m"], out["hf"]
    what = f"5 tenants, room for 2, {q['requests']} requests ({rounds} x {paging.HOT_SEQUENCE}), LRU; load {q['load'][0]:.1f}-{t['load'][1]:.1f}"
    rows: list[dict[str, Any]] = [
        {"name": f"rotation, requests/s: llama.cpp q4_k_m vs transformers f32 ({what})", "ours_text": f"{q['rps']:.2f} req/s",
         "peer": "transformers tenants (f32)", "peer_text": f"{t['rps']:.2f} req/s", "ratio": q["rps"] / t["rps"], "goal": "-"},
        {"name": f"rotation, loads (page-in records): llama.cpp q4_k_m vs transformers f32 ({what})", "ours_text": f"{q['loads']} loads",
         "peer": "transformers tenants (f32)", "peer_text": f"{t['loads']} loads", "ratio": t["loads"] / q["loads"] if q["loads"] else None,
         "goal": "same sequence, same LRU"},
    ]  # fmt: skip
    for k, m in (("q4_k_m", q), ("hf", t)):
        slack = m["reference_rss"] - m["budget"]
        row = {"name": f"memory: peak RSS of the resident's process tree, rotation of 5 {'llama.cpp q4_k_m' if k != 'hf' else 'transformers f32'} tenants",
               "ours_mb": m["peak_rss"] / MB, "peer": f"budget + slack ({m['peak_workers']} workers)", "peer_mb": m["reference_rss"] / MB,
               "ratio": m["peak_rss"] / m["reference_rss"], "goal": "<= 1.0 (ours/peer)",
               "notes": f"budget {m['budget'] / MB:.1f} MB + slack {slack / MB:.0f} MB (router {m['router_rss'] / MB:.0f} MB + "
                        f"{m['peak_workers']} x worker runtime {m['worker_runtime'] / MB:.0f} MB)"}  # fmt: skip
        if m["peak_rss"] > m["reference_rss"]:
            row["notes"] = "goal missed: " + row["notes"]
        rows.append(row)
    return rows, out


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM runs the finally blocks: no server left behind
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--shape", choices=["tiny", "qwen2-0.5b"], default="qwen2-0.5b")
    parser.add_argument("--tokens", type=int, default=8, help="tokens of each throughput request")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (the four tenants in turn each)")
    parser.add_argument("--reps", type=int, default=3, help="page-ins of each resident")
    parser.add_argument("--rotation-rounds", type=int, default=1, help=f"rounds of {paging.HOT_SEQUENCE} in each rotation")
    parser.add_argument("--only", default="throughput,pagein,rotation", help="comma-separated: throughput, pagein, rotation")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    if parts - {"throughput", "pagein", "rotation"}:
        parser.error(f"--only {args.only}: name some of throughput, pagein, rotation")
    llama = find_llama_cpp()
    if llama is None:
        raise SystemExit("llama.cpp is not built: bash .ci/llama-cpp")
    os.environ["ZOO_LLAMA_SERVER"] = str(llama.server)  # the residents' llama-server (Resident passes our environment)
    label = "Qwen2-0.5B shape" if args.shape == "qwen2-0.5b" else "tiny model"
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-engines-", dir=HERE.parent))
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"load_start": load()}
    started = time.monotonic()
    try:
        src = build(work, args.shape)
        extra["sizes"] = {k: sum(p.stat().st_size for p in d.iterdir() if p.suffix in (".gguf", ".safetensors")) for k, d in src.items()}
        if "throughput" in parts:
            print(f"==> throughput ({label})", file=sys.stderr, flush=True)
            got, extra["throughput"] = throughput(work, src, args.tokens, args.rounds)
            rows += got
        if "pagein" in parts:
            print(f"==> page-in ({label})", file=sys.stderr, flush=True)
            got, extra["pagein"] = page_in(work, src, args.reps)
            rows += got
        if "rotation" in parts:
            print(f"==> rotation ({label})", file=sys.stderr, flush=True)
            got, extra["rotation"] = rotation(work, src, args.rotation_rounds, (extra.get("pagein") or {}).get("footprints", {}))
            rows += got
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        row["name"] = f"{row['name']} [{label}]"
    print(table(rows))
    for row in rows:
        if row.get("notes"):
            print(f"  {row['name']}: {row['notes']}")
    print(f"({seconds(time.monotonic() - started)} in all, {os.cpu_count()} CPUs, load {extra['load_start']:.1f} at the start, {load():.1f} at the end)")
    if args.json:
        args.json.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "shape": args.shape, "measured": extra, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
