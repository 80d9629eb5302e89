"""Explicit adapter sets (issue #36): `model: "<tenant>:a+b"` and `x_zoo.adapters` with scales
answer exactly as peft composes the same adapters at the same scales; an undeclared, refused or
excluded adapter is a 400 naming it and its field; `<tenant>:auto` never picks one in `exclude`.

Uses the tiny model, adapters and bag-of-words embedder of the ``built`` fixture (tests/support/lora.py).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("peft", reason="the resident extra is not installed (pip install -e .[resident])")

from tests.support.lora import DESCRIPTIONS, LABELLED, adapter, backend, call, generated_ids, peft_ids  # noqa: E402

pytestmark = pytest.mark.resident

ALL = tuple(DESCRIPTIONS)  # code, terse, legal
TEXT = "Hello there"


def ask(model: str, x_zoo: dict[str, Any] | None = None, text: str = TEXT, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 12, "ignore_eos": True,
            **({"x_zoo": x_zoo} if x_zoo is not None else {}), **extra}  # fmt: skip


def post(b: Any, bodies: list[dict[str, Any]]) -> list[tuple[int, Any]]:
    return asyncio.run(call(b, [("POST", "/v1/chat/completions", body) for body in bodies]))


@pytest.fixture(scope="module")
def three(built: dict[str, Path]) -> Any:
    """All three adapters declared (ranks 4, 4 and 8 on other modules), '<tenant>:auto' composing up to three."""
    return backend(built, tuple(adapter(built, a) for a in ALL), threshold=0.3, max_adapters=3, combine="sum")


@pytest.fixture(scope="module")
def small(built: dict[str, Path]) -> Any:
    """The three adapters with max_loras 3: the refusals' backend (nothing is ever composed in it)."""
    return backend(built, tuple(adapter(built, a) for a in ALL), max_loras=3, threshold=0.3)


SETS = [  # (model, x_zoo, the adapters and scales peft composes)
    ("t:code+terse", None, (("code", 1.0), ("terse", 1.0))),
    ("t:legal+code", None, (("legal", 1.0), ("code", 1.0))),
    ("t", {"adapters": [{"name": "terse", "scale": 0.5}, {"name": "legal", "scale": 1.5}]}, (("terse", 0.5), ("legal", 1.5))),
    ("t", {"adapters": [{"name": "code", "scale": -0.5}, {"name": "terse"}, {"name": "legal", "scale": 2}]},
     (("code", -0.5), ("terse", 1.0), ("legal", 2.0))),
    ("m", {"adapters": [{"name": "legal", "scale": 0.25}]}, (("legal", 0.25),)),
]  # fmt: skip


@pytest.mark.parametrize(("model", "x_zoo", "expected"), SETS, ids=[m + json.dumps(x) if x else m for m, x, _ in SETS])
def test_an_explicit_set_answers_as_peft_composes_it_at_the_same_scales(
        built: dict[str, Path], three: Any, model: str, x_zoo: dict[str, Any] | None, expected: tuple[tuple[str, float], ...]) -> None:  # fmt: skip
    with generated_ids(three) as generated:
        ((status, body),) = post(three, [ask(model, x_zoo)])
    assert status == 200, body
    ids, scales = tuple(a for a, _ in expected), tuple(s for _, s in expected)
    reference = peft_ids(built, ids, combine="weighted", weights=scales)
    assert generated[TEXT] == reference  # token for token, greedy
    assert body["x_zoo"] == {"adapter": "+".join(f"{a}@1*{s:g}" for a, s in expected), "combine": "weighted",
                             "adapters": [{"id": a, "version": "1", "scale": s} for a, s in expected]}  # fmt: skip
    alone = [peft_ids(built, (aid,)) for aid in ids]
    assert all(reference != single for single in alone)  # not any one of its adapters alone
    if len(ids) > 1:
        assert reference != peft_ids(built, ids[:-1], combine="weighted", weights=scales[:-1])  # every adapter counts


def test_an_explicit_set_streams_and_runs_beside_other_requests_each_keeping_its_own(built: dict[str, Path], three: Any) -> None:
    bodies = [ask("t:code+terse"), ask("t:legal"), ask("t", {"adapters": [{"name": "terse", "scale": 0.5}, {"name": "legal", "scale": 1.5}]}),
              ask("t:auto", text="review python code for bugs and answer tersely in one short line"), ask("t")]  # fmt: skip

    def seen(answers: list[tuple[int, Any]]) -> list[tuple[int, str, Any]]:
        return [(status, body["choices"][0]["message"]["content"], body.get("x_zoo")) for status, body in answers]

    alone = seen([post(three, [body])[0] for body in bodies])
    assert seen(post(three, bodies)) == alone and all(status == 200 for status, _, _ in alone)  # concurrent: the engine batches them
    with generated_ids(three) as generated:
        ((status, streamed),) = post(three, [ask("t:code+terse", stream=True)])
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert status == 200 and events[-1]["x_zoo"] == alone[0][2] and events[-1]["x_zoo"]["adapter"] == "code@1*1+terse@1*1"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == alone[0][1] and generated[TEXT] == peft_ids(built, ("code", "terse"), combine="weighted", weights=(1.0, 1.0))


def test_a_set_scales_adapters_rather_than_ignoring_the_scale(three: Any) -> None:
    texts = [post(three, [ask("t", {"adapters": [{"name": "legal", "scale": s}]})])[0][1]["choices"][0]["message"]["content"]
             for s in (0.25, 1, 2)]  # fmt: skip
    assert len(set(texts)) == 3
    assert texts[1] == post(three, [ask("t:legal")])[0][1]["choices"][0]["message"]["content"]  # scale 1 alone: the adapter itself


@pytest.mark.parametrize(("model", "x_zoo", "param", "message"), [
    ("t:code+gone", None, "model", "model: adapter 'gone' is not declared for tenant 't' (declared: code, legal, terse)"),
    ("t", {"adapters": [{"name": "code"}, {"name": "gone", "scale": 0.5}]}, "x_zoo.adapters.1.name",
     "x_zoo.adapters.1.name: adapter 'gone' is not declared for tenant 't' (declared: code, legal, terse)"),
    ("t:code+terse", {"exclude": ["terse"]}, "model", "model: adapter 'terse' is excluded by x_zoo.exclude.0"),
    ("t", {"adapters": [{"name": "legal"}, {"name": "code"}], "exclude": ["terse", "code"]}, "x_zoo.adapters.1.name",
     "x_zoo.adapters.1.name: adapter 'code' is excluded by x_zoo.exclude.1"),
    ("t:code", {"exclude": ["code"]}, "model", "model: adapter 'code' is excluded by x_zoo.exclude.0"),
    ("t:auto", {"exclude": ["gone"]}, "x_zoo.exclude.0", "x_zoo.exclude.0: adapter 'gone' is not declared for tenant 't' (declared: code, legal, terse)"),
    ("t:code+code", None, "model", "model: adapter 'code' is named twice"),
    ("t:code+terse+legal+code", None, "model",
     "model: a set of 4 adapters; at most 3, the adapters this tenant keeps loaded at once (resources.max_loras)"),
    ("t", {"adapters": [{"name": "code", "scale": 2.5}]}, "x_zoo.adapters.0.scale", "x_zoo.adapters.0.scale: Input should be less than or equal to 2"),
    ("t", {"adapters": [{"name": "code", "scale": 0.33}]}, "x_zoo.adapters.0.scale",
     "x_zoo.adapters.0.scale: 0.33 is not a multiple of 0.05 (scales run from -2 to 2 in steps of 0.05, not 0)"),
    ("t", {"adapter": "code"}, "x_zoo.adapter", "x_zoo.adapter: Extra inputs are not permitted"),  # a typo never answers with the base
])  # fmt: skip
def test_an_adapter_a_set_may_not_have_is_refused_naming_it_and_its_field(
        small: Any, model: str, x_zoo: dict[str, Any] | None, param: str, message: str) -> None:  # fmt: skip
    b = small
    ((status, body),) = post(b, [ask(model, x_zoo)])
    assert (status, body["error"]["param"], body["error"]["message"]) == (400, param, message)
    assert not b.adapters.compositions and all(not n.startswith("compose-") for n in b.adapters.peft.peft_config)


def test_a_refused_adapter_is_never_composed_by_name(built: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "terse"
    shutil.copytree(built["terse"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    b = backend(built, (adapter(built, "code"), adapter(built, "terse").model_copy(update={"dir": bad})))
    ((status, body),) = post(b, [ask("t", {"adapters": [{"name": "code"}, {"name": "terse", "scale": 0.5}]})])
    assert (status, body["error"]["param"]) == (400, "x_zoo.adapters.1.name")
    assert body["error"]["message"].startswith("x_zoo.adapters.1.name: adapter 'terse' is refused: terse@1: adapter_config.json: r is 8")
    assert "terse" not in b.adapters.peft.peft_config and not b.adapters.compositions


def chosen(x: dict[str, Any]) -> list[str]:
    """The adapters that answered a '<tenant>:auto' request, most similar first."""
    if "adapters" in x:
        return [a["id"] for a in x["adapters"]]
    return [x["adapter"].split("@")[0]] if x["adapter"] else []


def test_auto_never_picks_an_excluded_adapter(three: Any) -> None:
    texts = [text for text, _ in LABELLED] + ["review python code tersely in one short line about legal contracts clauses"]
    before = {text: chosen(body["x_zoo"]) for text, (_, body) in zip(texts, post(three, [ask("t:auto", text=t) for t in texts]), strict=True)}
    assert before[texts[-1]] == ["terse", "code", "legal"]  # every adapter passes for it
    for excluded in ALL:
        answers = post(three, [ask("t:auto", {"exclude": [excluded]}, text=t) for t in texts])
        for text, (status, body) in zip(texts, answers, strict=True):
            assert status == 200, body
            assert chosen(body["x_zoo"]) == [a for a in before[text] if a != excluded], (excluded, text, body["x_zoo"])
    answers = post(three, [ask("t:auto", {"exclude": list(ALL)}, text=t) for t in texts])
    assert all(body["x_zoo"]["adapter"] is None for _, body in answers)  # all excluded: the base model answers


def test_distinct_scales_never_grow_the_cached_compositions_past_max_loras(built: dict[str, Path]) -> None:
    """A client cycling through scales builds one composition per request, but peft holds at most max_loras of them."""
    b = backend(built, (adapter(built, "code"), adapter(built, "terse")), max_loras=2)
    scales = [round(0.05 * k, 2) for k in range(1, 31)]
    bodies = [ask("t", {"adapters": [{"name": "code", "scale": s}, {"name": "terse", "scale": -s}]}, max_tokens=1) for s in scales]
    for body in bodies:
        ((status, answer),) = post(b, [body])
        assert status == 200, answer
        composed = [n for n in b.adapters.peft.peft_config if n.startswith("compose-")]
        assert len(b.adapters.compositions) <= 2 and sorted(composed) == sorted(b.adapters.compositions)
    assert b.adapters.stats.compositions_built == len(scales) and set(b.adapters.loaded) == {"code", "terse"}
