"""What a request asks of its tenant's adapters (issue #36): the pure decision of
``worker/adapter_sets.py`` and the body's ``x_zoo`` (bounded scales, bounded lists).

Every refusal is one line naming the adapter and the field; the engine's own checks (peft's
composition equal to peft's) are tests/integration/test_lora_sets.py.
"""

from __future__ import annotations

import pytest

from zoo_agent.resident.engine.base import AUTO, SET
from zoo_agent.resident.sessions.turns import Refusal
from zoo_agent.resident.worker.adapter_sets import Asked, Offer, asked

OFFER = Offer(tenant="t", model="m", declared=("code", "terse", "legal", "bad"), refused={"bad": "bad@1: adapter_config.json: r is 8"},
              max_loras=3, auto=True)  # fmt: skip


def refusal(result: Asked | Refusal) -> tuple[int, str | None, str]:
    assert isinstance(result, Refusal), result
    assert "\n" not in result.message
    return result.status, result.param, result.message


def test_the_base_one_adapter_and_auto_are_as_before() -> None:
    assert asked(OFFER, "t") == Asked(None) and asked(OFFER, "m") == Asked(None)
    assert asked(OFFER, "t:code") == Asked("code")
    assert asked(OFFER, "t:auto") == Asked(AUTO)
    assert refusal(asked(OFFER, "t:nope"))[:2] == (404, "model")
    assert refusal(asked(OFFER, "other:code"))[:2] == (404, "model")
    assert refusal(asked(OFFER, "t:bad")) == (400, "model", "model: adapter refused: bad@1: adapter_config.json: r is 8")
    assert refusal(asked(Offer("t", "m", ("code",), {}, 3, auto=False), "t:auto"))[:2] == (404, "model")


def test_a_set_in_model_composes_at_scale_1_in_the_callers_order() -> None:
    assert asked(OFFER, "t:terse+code") == Asked(SET, (("terse", 1.0), ("code", 1.0)))
    assert asked(OFFER, "t:terse+code+legal") == Asked(SET, (("terse", 1.0), ("code", 1.0), ("legal", 1.0)))


def test_a_set_in_x_zoo_carries_its_scales_and_one_adapter_at_scale_1_is_that_adapter() -> None:
    assert asked(OFFER, "t", [("code", 0.5), ("terse", -0.25)]) == Asked(SET, (("code", 0.5), ("terse", -0.25)))
    assert asked(OFFER, "t", [("code", 0.5)]) == Asked(SET, (("code", 0.5),))
    assert asked(OFFER, "t", [("code", 1.0)]) == Asked("code")
    assert asked(OFFER, "m", [("code", 1.0), ("legal", 2.0)]) == Asked(SET, (("code", 1.0), ("legal", 2.0)))


@pytest.mark.parametrize(("model", "adapters", "expected"), [
    ("t:code+nope", None,
     (400, "model", "model: adapter 'nope' is not declared for tenant 't' (declared: bad, code, legal, terse)")),
    ("t", [("code", 1.0), ("nope", 0.5)],
     (400, "x_zoo.adapters.1.name", "x_zoo.adapters.1.name: adapter 'nope' is not declared for tenant 't' (declared: bad, code, legal, terse)")),
    ("t:code+bad", None, (400, "model", "model: adapter 'bad' is refused: bad@1: adapter_config.json: r is 8")),
    ("t", [("bad", 0.5)], (400, "x_zoo.adapters.0.name", "x_zoo.adapters.0.name: adapter 'bad' is refused: bad@1: adapter_config.json: r is 8")),
    ("t:code+code", None, (400, "model", "model: adapter 'code' is named twice")),
    ("t", [("code", 1.0), ("terse", 1.0), ("code", 0.5)],
     (400, "x_zoo.adapters.2.name", "x_zoo.adapters.2.name: adapter 'code' is named twice (also x_zoo.adapters.0.name)")),
    ("t:code+terse+legal+bad", None,
     (400, "model", "model: a set of 4 adapters; at most 3, the adapters this tenant keeps loaded at once (resources.max_loras)")),
    ("t", [("code", 1.0)] * 4,
     (400, "x_zoo.adapters", "x_zoo.adapters: a set of 4 adapters; at most 3, the adapters this tenant keeps loaded at once (resources.max_loras)")),
    ("t:code+", None, (400, "model", "model: adapter '' is not declared for tenant 't' (declared: bad, code, legal, terse)")),
    ("t:auto+code", None, (400, "model", "model: adapter 'auto' is not declared for tenant 't' (declared: bad, code, legal, terse)")),
    ("t:code", [("code", 0.5)],
     (400, "x_zoo.adapters", "x_zoo.adapters: a set is asked here with model 't', or in model as 't:a+b', not both (model is 't:code')")),
    ("t:auto", [("code", 0.5)],
     (400, "x_zoo.adapters", "x_zoo.adapters: a set is asked here with model 't', or in model as 't:a+b', not both (model is 't:auto')")),
])  # fmt: skip
def test_a_set_is_refused_naming_the_adapter_and_its_field(model: str, adapters: list[tuple[str, float]] | None, expected: tuple[int, str, str]) -> None:
    assert refusal(asked(OFFER, model, adapters)) == expected


def test_a_name_is_quoted_bounded_and_on_one_line() -> None:
    status, param, message = refusal(asked(OFFER, "t:code+" + "x\n" * 10_000))
    assert (status, param) == (400, "model") and len(message) < 300 and "'x\\nx\\n" in message


def test_a_set_in_model_is_counted_before_it_is_split() -> None:
    """A 1 MiB model of '+' is refused by its count, not split into half a million names first."""
    status, param, message = refusal(asked(OFFER, "t:" + "+" * 500_000))
    assert (status, param) == (400, "model") and message.startswith("model: a set of 500001 adapters; at most 3")


def test_exclude_is_checked_and_refuses_what_the_set_names() -> None:
    assert asked(OFFER, "t:auto", exclude=["code", "bad"]) == Asked(AUTO, exclude=frozenset({"code", "bad"}))
    assert asked(OFFER, "t", exclude=["code"]) == Asked(None, exclude=frozenset({"code"}))
    assert asked(OFFER, "t:terse", exclude=["code"]) == Asked("terse", exclude=frozenset({"code"}))
    assert asked(OFFER, "t:terse+legal", exclude=["code"]) == Asked(SET, (("terse", 1.0), ("legal", 1.0)), frozenset({"code"}))
    assert refusal(asked(OFFER, "t:code", exclude=["terse", "code"])) == (
        400, "model", "model: adapter 'code' is excluded by x_zoo.exclude.1")
    assert refusal(asked(OFFER, "t:terse+code", exclude=["code"])) == (400, "model", "model: adapter 'code' is excluded by x_zoo.exclude.0")
    assert refusal(asked(OFFER, "t", [("terse", 0.5), ("code", 0.5)], exclude=["code"])) == (
        400, "x_zoo.adapters.1.name", "x_zoo.adapters.1.name: adapter 'code' is excluded by x_zoo.exclude.0")
    assert refusal(asked(OFFER, "t:auto", exclude=["code", "nope"])) == (
        400, "x_zoo.exclude.1", "x_zoo.exclude.1: adapter 'nope' is not declared for tenant 't' (declared: bad, code, legal, terse)")


def test_a_tenant_without_adapters_declares_none() -> None:
    bare = Offer("t", "m", (), {}, 0, auto=False)
    assert asked(bare, "t") == Asked(None)
    assert refusal(asked(bare, "t:a+b")) == (400, "model", "model: adapter 'a' is not declared for tenant 't' (declared: none)")
    assert refusal(asked(bare, "t", exclude=["a"])) == (400, "x_zoo.exclude.0", "x_zoo.exclude.0: adapter 'a' is not declared for tenant 't' (declared: none)")


@pytest.mark.parametrize(("x_zoo", "where"), [
    ({"adapters": [{"name": "code", "scale": 2.05}]}, "x_zoo.adapters.0.scale"),
    ({"adapters": [{"name": "code", "scale": -2.5}]}, "x_zoo.adapters.0.scale"),
    ({"adapters": [{"name": "code", "scale": 0.33}]}, "x_zoo.adapters.0.scale"),
    ({"adapters": [{"name": "code", "scale": 0}]}, "x_zoo.adapters.0.scale"),
    ({"adapters": [{"name": "code", "scale": "1"}]}, "x_zoo.adapters.0.scale"),
    ({"adapters": [{"name": "code", "scale": True}]}, "x_zoo.adapters.0.scale"),
    ({"adapters": [{"name": "code", "weight": 1}]}, "x_zoo.adapters.0.weight"),
    ({"adapters": [{"scale": 1}]}, "x_zoo.adapters.0.name"),
    ({"adapters": []}, "x_zoo.adapters"),
    ({"adapters": [{"name": "a"}] * 1025}, "x_zoo.adapters"),
    ({"exclude": ["a"] * 1025}, "x_zoo.exclude"),
    ({"exclude": "code"}, "x_zoo.exclude"),
    ({"adapter": "code"}, "x_zoo.adapter"),
    ({"adapters": {"name": "code"}}, "x_zoo.adapters"),
])  # fmt: skip
def test_the_body_bounds_scales_and_lists(x_zoo: dict[str, object], where: str) -> None:
    from pydantic import ValidationError

    from zoo_agent.resident.worker.bodies import ChatBody

    with pytest.raises(ValidationError) as caught:
        ChatBody.model_validate({"model": "t", "messages": [{"role": "user", "content": "hi"}], "x_zoo": x_zoo})
    errors = caught.value.errors()
    assert ".".join(str(p) for p in errors[0]["loc"]).startswith(where), errors[0]


def test_the_body_takes_scales_on_the_step_as_their_canonical_value() -> None:
    from zoo_agent.resident.worker.bodies import ChatBody

    body = ChatBody.model_validate({"model": "t", "messages": [{"role": "user", "content": "hi"}],
                                    "x_zoo": {"adapters": [{"name": "a", "scale": 0.15}, {"name": "b"}, {"name": "c", "scale": -2},
                                                           {"name": "d", "scale": 0.35000000001}], "exclude": ["e"]}})  # fmt: skip
    assert body.x_zoo is not None and body.x_zoo.adapters is not None
    assert [(a.name, a.scale) for a in body.x_zoo.adapters] == [("a", 0.15), ("b", 1.0), ("c", -2.0), ("d", 0.35)]
    assert body.x_zoo.exclude == ["e"]
    assert ChatBody.model_validate({"model": "t", "messages": [{"role": "user", "content": "hi"}]}).x_zoo is None
