"""The embedding worker's engine (issue #36) with a stand-in model (a text's vector is its token ids,
padded): passes of at most ``max_rows`` texts across requests, best priority first, a text too long
failing its request alone, a request whose client left never embedded, a pass that fails failing
only its requests, a stall seen. The real model's vectors are tests/integration/test_embeddings.py's."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from zoo_agent.resident.wire.http import ApiError
from zoo_agent.resident.wire.priority import CLASSES
from zoo_agent.resident.worker.embeddings import Embedded, EmbeddingEngine

WIDTH = 4


class _Tensor:
    def __init__(self, array: Any) -> None:
        self.array = array

    def numpy(self) -> Any:
        return self.array


class _Model:
    """Tokens are words (their lengths as ids); a vector is the first ``WIDTH`` ids. Each pass is recorded;
    ``hold`` keeps a pass from finishing until it is set; ``fail`` makes the next pass raise."""

    def __init__(self) -> None:
        self.passes: list[list[list[int]]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()
        self.fail = False

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [[len(w) for w in t.split()] for t in texts]

    def encode(self, ids: list[list[int]]) -> _Tensor:
        self.passes.append(ids)
        self.started.set()
        assert self.hold.wait(10)
        if self.fail:
            self.fail = False
            raise RuntimeError("CUDA out of memory")
        return _Tensor(np.array([(x + [0] * WIDTH)[:WIDTH] for x in ids], dtype=np.float32))


def _vectors(result: Embedded) -> list[tuple[float, ...]]:
    return [struct.unpack(f"<{WIDTH}f", row) for row in result.rows]


@pytest.fixture
def model() -> _Model:
    return _Model()


@pytest.fixture
def engine(model: _Model) -> Iterator[EmbeddingEngine]:
    e = EmbeddingEngine(model, max_rows=3, max_tokens=5)  # type: ignore[arg-type]
    yield e
    model.hold.set()
    e.close()


def test_a_request_spreads_over_passes_of_at_most_max_rows_longest_first_and_answers_in_its_order(engine: EmbeddingEngine, model: _Model) -> None:
    texts = ("a", "bb cc", "d", "eee f g", "hh", "i j", "kkkk")
    result = engine.submit(texts).future.result(10)
    assert [len(p) for p in model.passes] == [3, 3, 1]
    assert [len(x) for p in model.passes for x in p] == sorted((len(t.split()) for t in texts), reverse=True)
    assert _vectors(result) == [tuple(float(v) for v in ([len(w) for w in t.split()] + [0] * WIDTH)[:WIDTH]) for t in texts]
    assert result.prompt_tokens == sum(len(t.split()) for t in texts)


def test_texts_of_waiting_requests_share_a_pass_and_a_better_class_goes_first(engine: EmbeddingEngine, model: _Model) -> None:
    model.hold.clear()
    first = engine.submit(("a",))
    assert model.started.wait(10)  # the engine is in a pass: what arrives now waits for the next
    low = engine.submit(("b b", "c c", "d d", "e e"), CLASSES["batch"])
    high = engine.submit(("f", "g"), CLASSES["system"])
    assert (engine.waiting, engine.running) == (2, 1)
    model.hold.set()
    for job in (first, low, high):
        job.future.result(10)
    assert [[len(x) for x in p] for p in model.passes] == [[1], [1, 1, 2], [2, 2, 2]]  # system's two, then batch's, three at a time


def test_a_text_too_long_fails_its_request_alone_naming_it(engine: EmbeddingEngine, model: _Model) -> None:
    model.hold.clear()
    blocker = engine.submit(("a",))
    assert model.started.wait(10)
    bad = engine.submit(("ok", "one two three four five six"))
    good = engine.submit(("fine",))
    model.hold.set()
    with pytest.raises(ApiError) as caught:
        bad.future.result(10)
    assert (caught.value.status, caught.value.param, caught.value.message) == (400, "input", "input[1]: 6 tokens; this model embeds at most 5 per text")
    assert _vectors(good.future.result(10)) == [(4.0, 0.0, 0.0, 0.0)] and blocker.future.result(10)
    assert all(len(x) <= 5 for p in model.passes for x in p)


def test_a_request_whose_client_left_is_never_embedded(engine: EmbeddingEngine, model: _Model) -> None:
    model.hold.clear()
    engine.submit(("a",))
    assert model.started.wait(10)
    gone = engine.submit(("never embedded here",))
    engine.cancel(gone)
    assert gone.future.cancelled() and engine.jobs() == 1
    model.hold.set()
    assert engine.submit(("after",)).future.result(10)
    assert [len(x) for p in model.passes for x in p] == [1, 1]
    assert engine.metrics.cancelled._value.get() == 1


def test_a_pass_that_fails_fails_its_requests_and_the_engine_goes_on(engine: EmbeddingEngine, model: _Model) -> None:
    model.fail = True
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.submit(("a", "b")).future.result(10)
    assert engine.submit(("c",)).future.result(10).prompt_tokens == 1
    assert engine.jobs() == 0


def test_a_stall_is_work_waiting_with_no_pass_ending(model: _Model) -> None:
    now = [100.0]
    engine = EmbeddingEngine(model, max_rows=2, max_tokens=8, clock=lambda: now[0])  # type: ignore[arg-type]
    try:
        now[0] = 500.0
        assert not engine.stalled(60)  # idle for long: no stall
        model.hold.clear()
        job = engine.submit(("a",))
        assert model.started.wait(10)
        now[0] = 530.0
        assert not engine.stalled(60)
        now[0] = 561.0
        assert engine.stalled(60)
        model.hold.set()
        job.future.result(10)
        assert not engine.stalled(60)
    finally:
        model.hold.set()
        engine.close()

