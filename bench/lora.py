"""LoRA benchmarks (issue #6): our adapter handling against bare peft calls, same run, same process.

    .venv/bin/python bench/lora.py [--shape qwen2-0.5b|tiny] [--rank 16] [--json bench/lora.json]

Builds the model shape and three random rank-R adapters on q/k/v/o, then measures (median of
repeated runs): loading a declared adapter (ours: the adapter_config check + peft
load_adapter + LRU bookkeeping; peer: peft load_adapter alone); switching between loaded
adapters (ours: `using()`; peer: set_adapter); a new version swapped in place (ours:
`update()`, which checks the config and calls hotswap; peer: peft's hotswap_adapter); and
time to the first generated token with an adapter against the base model (the goal is a
ratio: at most 1.2x).

Compositions (issue #21): `<tenant>:auto` choosing all three adapters for one request, composed
"sum" (peft's multiple active adapters) or "weighted" (add_weighted_adapter "cat"), time from
the request to its first token against the same path choosing one adapter (max_adapters 1):
warm (the composition cached), cold (its first request: composed now, its adapters loaded) and
cold from disk (its adapters loaded too). The seed's goal: a layer swap under 500 ms, i.e. a cold
composition's first token at most 500 ms after a single adapter's. Also the weighted build
alone against peft's add_weighted_adapter on the bare model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from common import table  # noqa: E402

SHAPES = ("qwen2-0.5b", "tiny")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def median_of(fn: Callable[[], object], runs: int, setup: Callable[[], object] | None = None) -> float:
    samples = []
    for _ in range(runs):
        if setup is not None:
            setup()
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, default="qwen2-0.5b")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter
    from transformers import AutoModelForCausalLM

    from zoo_agent.demo.tiny import QWEN2_05B_SHAPE, build_tiny_adapter, build_tiny_model
    from zoo_agent.resident.config import AdapterConfig, WorkerConfig
    from zoo_agent.resident.engine.base import Generated, Request
    from zoo_agent.resident.worker.adapters import Adapters
    from zoo_agent.resident.worker.backend import TransformersBackend

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-lora-"))
    shape: dict[str, Any] = QWEN2_05B_SHAPE if args.shape == "qwen2-0.5b" else {}
    print(f"building the {args.shape} model and three rank-{args.rank} adapters in {work} ...", file=sys.stderr)
    base_dir = build_tiny_model(work / "base", **shape)
    dirs = [build_tiny_adapter(base_dir, work / f"a{i}", seed=i, rank=args.rank, targets=TARGETS, base_name="base") for i in range(3)]
    declared = tuple(AdapterConfig(id=f"a{i}", version="1", dir=d, rank=args.rank) for i, d in enumerate(dirs))

    # -- ours: the backend the worker runs ---------------------------------------------
    worker = WorkerConfig(tenant="t", model="base", version="1", version_dir=base_dir, adapters=declared[:2], max_loras=8, base_names=("base",))
    ours = TransformersBackend(base_dir, allow_pickle=False, allow_code=False, device="cpu", worker=worker)
    ours.load()
    adapters: Adapters = ours.adapters  # type: ignore[assignment]
    adapters.declared["a2"] = declared[2]
    load_ours = median_of(lambda: adapters.load("a2"), args.runs, setup=lambda: "a2" in adapters.loaded and adapters.unload("a2"))
    flip = itertools.cycle(["a0", "a1"])

    def switch_ours() -> None:
        with adapters.using(next(flip)):
            pass

    switch_ours_s = median_of(switch_ours, args.runs * 5)
    counter = itertools.count(2)

    def swap_ours() -> None:  # version n of a0 carries a1's or a2's weights: same rank and targets
        n = next(counter)
        adapters.update((declared[0].model_copy(update={"version": str(n), "dir": dirs[1 + n % 2]}), declared[1], declared[2]))

    swap_ours_s = median_of(swap_ours, args.runs)

    def first_token(aid: str | None) -> float:
        return median_of(lambda: ours.complete(Request([{"role": "user", "content": "Hello, how are you?"}], None, 1, 0.0, 1.0, adapter=aid),
                                               Generated()), args.runs)  # fmt: skip

    ttft_base, ttft_adapter = first_token(None), first_token("a1")
    compositions = compose_rows(ours, work, declared, args.runs)

    # -- the peer: bare peft on a fresh copy of the model -------------------------------
    model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="a0")
    peft_model.load_adapter(str(dirs[1]), adapter_name="a1")
    load_peer = median_of(lambda: peft_model.load_adapter(str(dirs[2]), adapter_name="a2"), args.runs,
                          setup=lambda: "a2" in peft_model.peft_config and (peft_model.set_adapter("a0"), peft_model.delete_adapter("a2")))  # fmt: skip
    flip = itertools.cycle(["a0", "a1"])
    switch_peer = median_of(lambda: peft_model.set_adapter(next(flip)), args.runs * 5)
    swap_peer = median_of(lambda: hotswap_adapter(peft_model, str(dirs[1 + next(counter) % 2]), adapter_name="a0"), args.runs)
    peft_model.load_adapter(str(dirs[2]), adapter_name="a2") if "a2" not in peft_model.peft_config else None

    def unmix() -> None:
        if "mix" in peft_model.peft_config:
            peft_model.set_adapter("a0")
            peft_model.delete_adapter("mix")

    build_peer = median_of(lambda: peft_model.add_weighted_adapter(["a0", "a1", "a2"], [0.35, 0.35, 0.3], "mix", combination_type="cat"),
                           args.runs, setup=unmix)  # fmt: skip

    rows = [
        {"name": f"load a declared rank-{args.rank} adapter", "ours_s": load_ours, "peer": "peft load_adapter", "peer_s": load_peer,
         "ratio": load_ours / load_peer, "goal": "<= 500 ms"},
        {"name": "switch between loaded adapters (p50)", "ours_s": switch_ours_s, "peer": "peft set_adapter", "peer_s": switch_peer,
         "ratio": switch_ours_s / switch_peer, "goal": "<= 15 ms"},
        {"name": "new adapter version swapped in place", "ours_s": swap_ours_s, "peer": "peft hotswap_adapter", "peer_s": swap_peer,
         "ratio": swap_ours_s / swap_peer, "goal": "no restart"},
        {"name": "first token with an adapter vs the base model", "ours_s": ttft_adapter, "peer": "same backend, no adapter", "peer_s": ttft_base,
         "ratio": ttft_adapter / ttft_base, "goal": "<= 1.2x"},
        *compositions["rows"],
        {"name": "build a weighted composition of three adapters", "ours_s": compositions["build_s"], "peer": "peft add_weighted_adapter",
         "peer_s": build_peer, "ratio": compositions["build_s"] / build_peer, "goal": "<= 500 ms"},
    ]  # fmt: skip
    print(f"\nLoRA, {args.shape} shape, rank {args.rank} on {','.join(TARGETS)}, CPU, {torch.get_num_threads()} threads, median of {args.runs}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "rank": args.rank, "rows": rows}, indent=2) + "\n")
    return 0


def compose_rows(ours: Any, work: Path, declared: tuple[Any, ...], runs: int) -> dict[str, Any]:
    """First tokens of '<tenant>:auto' composing all three adapters vs choosing one (issue #21), and the weighted build."""
    from zoo_agent.demo.tiny import build_tiny_embedder
    from zoo_agent.resident.config import SelectionConfig
    from zoo_agent.resident.engine.base import AUTO, Generated, Request
    from zoo_agent.resident.worker.selection import Composition, Selector

    task = "review typescript code with strict typing"  # every adapter describes it: all three pass the threshold
    selection = SelectionConfig(embedding_dir=build_tiny_embedder(work / "embedder", task), embedding_label="e@1", threshold=0.5)
    adapters, ids = ours.adapters, [a.id for a in declared]
    ours.selector = Selector(selection.embedding_dir, selection.threshold, max_adapters=1)
    ours.selector.index([adapters.declared[aid].model_copy(update={"description": task}) for aid in ids])
    request = Request([{"role": "user", "content": f"please {task}"}], None, 1, 0.0, 1.0, adapter=AUTO)

    def ttft(setup: Callable[[], object] | None = None) -> float:
        return median_of(lambda: ours.complete(request, Generated()), runs, setup=setup)

    def uncached() -> None:
        for name in list(adapters.compositions):
            adapters._drop(name)

    def unloaded() -> None:
        for aid in ids:
            if aid in adapters.loaded:
                adapters.unload(aid)  # its compositions go with it

    single = ttft()
    rows, build = [], 0.0
    ours.selector.max_adapters = 3
    for combine in ("sum", "weighted"):
        ours.worker = ours.worker.model_copy(update={"selection": selection.model_copy(update={"max_adapters": 3, "combine": combine})})
        ours.complete(request, check := Generated())
        assert check.combine == combine and len(check.adapters) == 3, check  # what is measured is a composition of three
        figures = {"warm (cached)": ttft(), "cold (composed now)": ttft(uncached), "cold from disk (adapters loaded too)": ttft(unloaded)}
        for when, seconds in figures.items():
            rows.append({"name": f"first token, 3 adapters {'summed' if combine == 'sum' else 'weighted'}, {when}", "ours_s": seconds,
                         "peer": "same path, one adapter chosen", "peer_s": single, "ratio": seconds / single,
                         "goal": "<= 1.2x" if when.startswith("warm") else "+<= 500 ms (layer swap)"})  # fmt: skip
    mix = Composition(tuple(ids), "weighted", (0.35, 0.35, 0.3))
    build = median_of(lambda: adapters.compose(mix), runs, setup=uncached)
    return {"rows": rows, "build_s": build}


if __name__ == "__main__":
    sys.exit(main())
