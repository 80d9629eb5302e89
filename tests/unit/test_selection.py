"""The pure decisions of adapter assembly (issue #21): which adapters, in which order, with which weights."""

from __future__ import annotations

import pytest

from zoo_agent.resident.worker.selection import Composition, compose, normalised_weights, ranked

IDS = ("code", "terse", "legal", "ts")


@pytest.mark.parametrize(("scores", "threshold", "limit", "exclude", "expected"), [
    ((0.9, 0.8, 0.7, 0.1), 0.7, 3, (), [("code", 0.9), ("terse", 0.8), ("legal", 0.7)]),  # the threshold itself passes
    ((0.1, 0.8, 0.9, 0.75), 0.7, 3, (), [("legal", 0.9), ("terse", 0.8), ("ts", 0.75)]),  # most similar first
    ((0.9, 0.8, 0.7, 0.95), 0.7, 2, (), [("ts", 0.95), ("code", 0.9)]),  # at most limit
    ((0.8, 0.9, 0.8, 0.8), 0.5, 4, (), [("terse", 0.9), ("code", 0.8), ("legal", 0.8), ("ts", 0.8)]),  # ties: declared order
    ((0.8, 0.8, 0.8, 0.8), 0.5, 1, (), [("code", 0.8)]),  # as argmax chose one
    ((0.9, 0.8, 0.7, 0.1), 0.7, 3, ("code",), [("terse", 0.8), ("legal", 0.7)]),  # a refused adapter is never chosen
    ((0.6, 0.5, 0.4, 0.3), 0.7, 3, (), []),  # none passes: the base model
    ((-0.2, -0.1, -0.5, -0.9), -0.3, 2, (), [("terse", -0.1), ("code", -0.2)]),
    ((), 0.7, 3, (), []),
])  # fmt: skip
def test_ranked(scores: tuple[float, ...], threshold: float, limit: int, exclude: tuple[str, ...], expected: list[tuple[str, float]]) -> None:
    assert ranked(IDS[: len(scores)], scores, threshold=threshold, limit=limit, exclude=frozenset(exclude)) == expected


@pytest.mark.parametrize(("similarities", "expected"), [
    ((0.81, 0.81), (0.5, 0.5)),
    ((0.5701, 0.4296, 0.3192), (0.45, 0.3, 0.25)),  # 0.43, 0.33, 0.24: the largest remainders round up, the sum stays 1
    ((0.9, 0.3), (0.75, 0.25)),
    ((1.0, 1.0, 1.0), (0.35, 0.35, 0.3)),  # steps of 0.05 cannot split three ways: the first ones get the rest
    ((0.4, -0.2), (1.0, 0.0)),  # a negative similarity weighs nothing
    ((-0.4, -0.2), (0.5, 0.5)),  # nothing left: the same weight each
])  # fmt: skip
def test_normalised_weights(similarities: tuple[float, ...], expected: tuple[float, ...]) -> None:
    weights = normalised_weights(similarities)
    assert weights == expected and round(sum(weights), 6) == 1


def test_compose_keeps_the_order_and_weighs_only_when_weighted() -> None:
    picked = [("ts", 0.81), ("code.review", 0.75)]
    assert compose(picked, "sum") == Composition(("ts", "code.review"), "sum")
    assert compose(picked, "weighted") == Composition(("ts", "code.review"), "weighted", (0.5, 0.5))


def test_a_composition_name_is_stable_distinct_and_a_module_name() -> None:
    a = Composition(("ts", "code.review"), "sum")
    others = [Composition(("code.review", "ts"), "sum"), Composition(("ts", "code.review"), "weighted", (0.5, 0.5)),
              Composition(("ts", "code.review"), "weighted", (0.55, 0.45))]  # fmt: skip
    assert a.name == Composition(("ts", "code.review"), "sum").name and a.name.startswith("compose-")
    assert len({a.name, *(o.name for o in others)}) == 4 and "." not in a.name  # torch's ModuleDict refuses '.'
    assert a.label(["ts@1", "code.review@2"]) == "ts@1+code.review@2"
    assert others[2].label(["code.review@2", "ts@1"]) == "code.review@2*0.55+ts@1*0.45"

