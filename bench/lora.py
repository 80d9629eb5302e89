"""LoRA benchmarks (issue #6): our adapter handling against bare peft calls, same run, same process.

    .venv/bin/python bench/lora.py [--shape qwen2-0.5b|tiny] [--rank 16] [--json bench/lora.json]

Builds the model shape and three random rank-R adapters on q/k/v/o, then measures (median of
repeated runs): loading a declared adapter (ours: the adapter_config check + peft
load_adapter + LRU bookkeeping; peer: peft load_adapter alone); switching between loaded
adapters (ours: `using()`; peer: set_adapter); a new version swapped in place (ours:
`update()`, which checks the config and calls hotswap; peer: peft's hotswap_adapter); and
time to the first generated token with an adapter against the base model (the goal is a
ratio: at most 1.2x).
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

    from zoo_agent.resident.adapters import Adapters
    from zoo_agent.resident.backend import Generated, Request, TransformersBackend
    from zoo_agent.resident.config import AdapterConfig, WorkerConfig
    from zoo_agent.resident.tiny import QWEN2_05B_SHAPE, build_tiny_adapter, build_tiny_model

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

    # -- the peer: bare peft on a fresh copy of the model -------------------------------
    model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="a0")
    peft_model.load_adapter(str(dirs[1]), adapter_name="a1")
    load_peer = median_of(lambda: peft_model.load_adapter(str(dirs[2]), adapter_name="a2"), args.runs,
                          setup=lambda: "a2" in peft_model.peft_config and (peft_model.set_adapter("a0"), peft_model.delete_adapter("a2")))  # fmt: skip
    flip = itertools.cycle(["a0", "a1"])
    switch_peer = median_of(lambda: peft_model.set_adapter(next(flip)), args.runs * 5)
    swap_peer = median_of(lambda: hotswap_adapter(peft_model, str(dirs[1 + next(counter) % 2]), adapter_name="a0"), args.runs)

    rows = [
        {"name": f"load a declared rank-{args.rank} adapter", "ours_s": load_ours, "peer": "peft load_adapter", "peer_s": load_peer,
         "ratio": load_ours / load_peer, "goal": "<= 500 ms"},
        {"name": "switch between loaded adapters (p50)", "ours_s": switch_ours_s, "peer": "peft set_adapter", "peer_s": switch_peer,
         "ratio": switch_ours_s / switch_peer, "goal": "<= 15 ms"},
        {"name": "new adapter version swapped in place", "ours_s": swap_ours_s, "peer": "peft hotswap_adapter", "peer_s": swap_peer,
         "ratio": swap_ours_s / swap_peer, "goal": "no restart"},
        {"name": "first token with an adapter vs the base model", "ours_s": ttft_adapter, "peer": "same backend, no adapter", "peer_s": ttft_base,
         "ratio": ttft_adapter / ttft_base, "goal": "<= 1.2x"},
    ]  # fmt: skip
    print(f"\nLoRA, {args.shape} shape, rank {args.rank} on {','.join(TARGETS)}, CPU, {torch.get_num_threads()} threads, median of {args.runs}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "rank": args.rank, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
