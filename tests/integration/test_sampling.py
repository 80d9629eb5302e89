"""Sampling parameters at their edges on a real tiny model. A temperature the API allows but a
float32 division cannot survive (5e-324, the smallest double: logits / t overflow to inf and
softmax gives NaN) made the batcher's ``torch.multinomial`` fail with "probability tensor
contains inf/nan", a 500. Like vLLM (``_SAMPLING_EPS``), a temperature below 1e-5 is greedy.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")

pytestmark = pytest.mark.resident

TINY = [5e-324, 1e-300, 1e-8]


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from zoo_agent.demo.tiny import build_tiny_model
    from zoo_agent.resident.worker.backend import TransformersBackend

    b = TransformersBackend(build_tiny_model(tmp_path_factory.mktemp("sampling") / "model"), allow_pickle=False, allow_code=False, device="cpu")
    b.load()
    return b


def answer(scheduler: Any, temperature: float) -> str:
    """The text one request gets, or the exception it ended with as a string."""
    from zoo_agent.resident.engine.base import Generated, Request

    done, out = threading.Event(), []

    def emit(item: Any) -> None:
        if isinstance(item, (Generated, BaseException)):
            out.append(item.text if isinstance(item, Generated) else f"failed: {item!r}")
            done.set()

    scheduler.submit(Request(None, "Hello there", 8, temperature, 1.0, ignore_eos=True), Generated(), threading.Event(), emit, stream=False)
    assert done.wait(120), "no answer in 120 s"
    return str(out[0])


@pytest.mark.parametrize("kind", ["serial", "batcher"])
def test_a_vanishing_temperature_is_greedy_not_a_nan(backend: Any, kind: str) -> None:
    from zoo_agent.resident.engine.batcher import Batcher
    from zoo_agent.resident.engine.serial import Serial

    scheduler = Serial(backend) if kind == "serial" else Batcher(backend, max_batch=2)
    try:
        greedy = answer(scheduler, 0.0)
        assert not greedy.startswith("failed"), greedy
        assert [answer(scheduler, t) for t in TINY] == [greedy] * len(TINY)
    finally:
        scheduler.close()
