"""What a request asks of its tenant's adapters (issue #36): the pure decision of
``worker/adapter_sets.py`` and the body's ``x_zoo`` (bounded scales, bounded lists).

Every refusal is one line naming the adapter and the field; the engine's own checks (peft's
composition equal to peft's) are tests/integration/test_lora_sets.py.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    ("t", [], (400, "x_zoo.adapters", "x_zoo.adapters: an empty set; name at least one adapter")),
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
    status, param, message = refusal(asked(OFFER, "t:\n" + "x" * 10_000))  # the tenant's, but no adapter of it
    assert (status, param) == (404, "model") and len(message) < 200 and message.startswith("model 't:\\nxxx")


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


NAMES = st.one_of(st.sampled_from(["code", "terse", "legal", "bad", "auto", "", "t", "m"]), st.text(max_size=8))
MODELS = st.one_of(st.sampled_from(["t", "m", "t:auto"]), st.lists(NAMES, max_size=6).map(lambda names: "t:" + "+".join(names)), st.text(max_size=20))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(model=MODELS, adapters=st.none() | st.lists(st.tuples(NAMES, st.sampled_from([1.0, 0.5, -2.0])), max_size=6),
       exclude=st.lists(NAMES, max_size=4))  # fmt: skip
def test_any_request_is_a_decision_or_a_one_line_refusal(model: str, adapters: list[tuple[str, float]] | None, exclude: list[str]) -> None:
    """Nothing a client sends raises; what passes names only declared, unrefused, unexcluded adapters, each once, at most max_loras."""
    result = asked(OFFER, model, adapters, exclude)
    if isinstance(result, Refusal):
        assert result.status in (400, 404) and "\n" not in result.message and result.param is not None
        assert result.message.startswith(result.param) or result.message.startswith(f"model {model[:100]!r}")
        return
    names = [aid for aid, _ in result.scaled] if result.adapter == SET else [result.adapter] if result.adapter not in (None, AUTO) else []
    assert all(n in OFFER.declared and n not in OFFER.refused and n not in result.exclude for n in names)
    assert len(set(names)) == len(names) <= OFFER.max_loras and result.exclude == frozenset(exclude)
    assert (result.adapter == SET) == (len(names) > 1 or any(scale != 1.0 for _, scale in result.scaled))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(x_zoo=st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
                          lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["adapters", "exclude", "name", "scale", "x"]), inner,
                                                                                      max_size=3), max_leaves=12))  # fmt: skip
def test_any_x_zoo_is_read_or_refused_by_the_body(x_zoo: object) -> None:
    from pydantic import ValidationError

    from zoo_agent.resident.worker.bodies import ChatBody

    try:
        body = ChatBody.model_validate({"model": "t", "messages": [{"role": "user", "content": "hi"}], "x_zoo": x_zoo})
    except ValidationError:
        return
    if body.x_zoo is not None and body.x_zoo.adapters is not None:
        assert all(-2 <= a.scale <= 2 and a.scale != 0 and abs(a.scale / 0.05 - round(a.scale / 0.05)) < 1e-9 for a in body.x_zoo.adapters)
