"""What `plan` prints and `apply` logs for each step, in both tenses (issue #24).

The same Step is "would fetch ..." in `plan` and "fetching ..." in `apply`: these lines
are what an operator reads before saying yes, so each is pinned word for word here
(`bash .ci/mutate` found most of Step.describe's mutants alive).
"""

from __future__ import annotations

import pytest

from zoo_agent.formats import human_bytes
from zoo_agent.plan import Action, Origin, Reuse, Step


def _reuse(*origins: tuple[str, str], size: int = 1500) -> tuple[Reuse, ...]:
    return tuple(Reuse(f"f{i}", size, Origin("models" if kind == "m" else "loras", aid, "v1", f"f{i}"))
                 for i, (kind, aid) in enumerate(origins))  # fmt: skip


@pytest.mark.parametrize(("step", "plan", "apply"), [
    (Step(Action.FETCH, "models", "m", "v2", size=2_500_000, files=3), "would fetch model m v2 (3 files, 2.5 MB)",
     "fetching model m v2 (3 files, 2.5 MB)"),
    (Step(Action.FETCH, "loras", "r", "v1", size=999, files=1, resume="v1.tmp.1.ab"),
     "would fetch lora r v1 (1 files, 999 B, resuming an interrupted fetch)", "fetching lora r v1 (1 files, 999 B, resuming an interrupted fetch)"),
    (Step(Action.FETCH, "models", "m", "v2", size=5000, files=3, reuse=_reuse(("m", "a"))),
     "model m v2: would reuse 1 file (1.5 kB) from model a v1; would fetch 2 files (3.5 kB)",
     "model m v2: reusing 1 file (1.5 kB) from model a v1; fetching 2 files (3.5 kB)"),
    (Step(Action.FETCH, "models", "m", "v2", size=3000, files=3, resume="x", reuse=_reuse(("m", "a"), ("l", "b"), ("m", "a"), size=1000)),
     "model m v2: would reuse 3 files (3.0 kB) from model a v1, lora b v1; nothing to fetch, resuming an interrupted fetch",
     "model m v2: reusing 3 files (3.0 kB) from model a v1, lora b v1; nothing to fetch, resuming an interrupted fetch"),
    (Step(Action.FETCH, "models", "m", "v2", size=6000, files=5, reuse=_reuse(("m", "a"), ("m", "b"), ("m", "c"), ("m", "d"), size=1000)),
     "model m v2: would reuse 4 files (4.0 kB) from model a v1, model b v1, model c v1 and 1 more; would fetch 1 file (2.0 kB)",
     "model m v2: reusing 4 files (4.0 kB) from model a v1, model b v1, model c v1 and 1 more; fetching 1 file (2.0 kB)"),
    (Step(Action.FETCH, "models", "m", "v2", size=3000, files=3, reuse=_reuse(("m", "a"), ("m", "b"), ("m", "c"), size=1000)),
     "model m v2: would reuse 3 files (3.0 kB) from model a v1, model b v1, model c v1; nothing to fetch",
     "model m v2: reusing 3 files (3.0 kB) from model a v1, model b v1, model c v1; nothing to fetch"),
    (Step(Action.PUBLISH, "models", "m", "v2"), "would publish model m v2", "publishing model m v2"),
    (Step(Action.SWAP_CURRENT, "models", "m", "v2", previous="v1"), "would switch model m v2 to current (was v1)",
     "switching model m v2 to current (was v1)"),
    (Step(Action.SWAP_CURRENT, "loras", "r", "v2"), "would switch lora r v2 to current", "switching lora r v2 to current"),
    (Step(Action.VERIFY, "models", "m", "v1", reason="2 files drifted"), "would re-verify model m v1: 2 files drifted",
     "re-verifying model m v1: 2 files drifted"),
    (Step(Action.RETAIN, "models", "m", "v0", reason="previous"), "would keep model m v0 (previous)", "keeping model m v0 (previous)"),
    (Step(Action.REMOVE, "models", "m", "v0", reason="beyond retention"), "would remove model m v0 (beyond retention)",
     "removing model m v0 (beyond retention)"),
    (Step(Action.NOOP, "models", "m", "v1"), "model m v1 is up to date", "model m v1 is up to date"),
    (Step(Action.REFUSE, "models", "m", "v1", reason="bump the version"), "cannot publish model m v1: bump the version",
     "cannot publish model m v1: bump the version"),
    (Step(Action.REMOVE, "models", "m", reason="undeclared"), "would remove model m (undeclared)", "removing model m (undeclared)"),
])  # fmt: skip
def test_each_step_reads_the_same_in_both_tenses(step: Step, plan: str, apply: str) -> None:
    assert step.describe("plan") == plan
    assert step.describe("apply") == apply


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (1049, "1.0 kB"), (999_949, "999.9 kB"), (1_000_000, "1.0 MB"),
    (2_340_000_000, "2.3 GB"), (1e12, "1.0 TB"), (5e15, "5000.0 TB"),
])  # fmt: skip
def test_human_bytes(n: float, text: str) -> None:
    assert human_bytes(n) == text
