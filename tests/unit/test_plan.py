"""plan() and plan_gc() as tables of literal inputs (issue #3), as stc-ng tests compare_units."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.index import SHA_A, SHA_B, SHA_C
from zoo_agent.errors import UsageError
from zoo_agent.index.model import FileEntry, FileSource, Index
from zoo_agent.plan import (
    Action,
    Desired,
    Have,
    Observed,
    Origin,
    Plan,
    Seen,
    Step,
    Want,
    desired_for_host,
    desired_for_tenant,
    holdings,
    plan,
    plan_gc,
)

SRC = FileSource(type="file", path="src")
FILES = (FileEntry(path="a", sha256=SHA_A, size=10), FileEntry(path="b", sha256=SHA_B, size=20))
PINS = frozenset({("a", SHA_A, 10), ("b", SHA_B, 20)})


def want(version: str = "v2", aid: str = "m") -> Want:
    return Want("models", aid, version, SRC, FILES)


def seen(versions: dict[str, Have], current: str | None = None, previous: str | None = None, leftovers: tuple[str, ...] = (), aid: str = "m") -> Seen:
    return Seen("models", aid, versions, current, previous, leftovers)


def have(version: str, pins: Any = PINS, drifted: tuple[str, ...] = (), at: str = "2026-01-01") -> Have:
    return Have(version, pins, drifted, at, 30)


def actions(p: Any) -> list[tuple[str, str]]:
    return [(s.action.value, s.version) for s in p]


PLAN_CASES = [
    ("empty zoo: fetch, publish, switch", {}, [("fetch", "v2"), ("publish", "v2"), ("swap-current", "v2")]),
    ("up to date", {("models", "m"): seen({"v2": have("v2")}, "v2")}, [("no-op", "v2")]),
    ("new version", {("models", "m"): seen({"v1": have("v1")}, "v1")}, [("fetch", "v2"), ("publish", "v2"), ("swap-current", "v2")]),
    ("published, not current (after rollback)", {("models", "m"): seen({"v1": have("v1"), "v2": have("v2")}, "v1", "v2")}, [("swap-current", "v2")]),
    ("same label, other bytes", {("models", "m"): seen({"v2": have("v2", frozenset({("a", SHA_B, 10)}))}, "v2")}, [("refuse", "v2")]),
    ("stat drift", {("models", "m"): seen({"v2": have("v2", drifted=("a",))}, "v2")}, [("verify", "v2"), ("no-op", "v2")]),
    ("manifest lost", {("models", "m"): seen({"v2": have("v2", pins=None)}, "v2")}, [("verify", "v2"), ("no-op", "v2")]),
    ("leftover staging", {("models", "m"): seen({"v2": have("v2")}, "v2", leftovers=("v3.tmp.1.ab",))}, [("remove", "v3.tmp.1.ab"), ("no-op", "v2")]),
    ("dangling current: version dir gone", {("models", "m"): seen({}, "v2")}, [("fetch", "v2"), ("publish", "v2"), ("swap-current", "v2")]),
]


@pytest.mark.parametrize(("name", "seen_", "expected"), PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plan(name: str, seen_: dict[Any, Seen], expected: list[tuple[str, str]]) -> None:
    assert actions(plan(Desired("h", (want(),)), Observed(seen_))) == expected


def test_plan_is_a_value_and_deletes_nothing() -> None:
    observed = Observed({("models", "old"): seen({"v1": have("v1")}, "v1", aid="old")})
    p = plan(Desired("h", (want(),)), observed)
    assert isinstance(p.steps, tuple)
    assert all(s.action is not Action.REMOVE for s in p)
    with pytest.raises(AttributeError):
        p.steps[0].version = "x"  # type: ignore[misc]
    assert p == plan(Desired("h", (want(),)), observed)


def test_swap_records_previous() -> None:
    (_, _, swap) = plan(Desired("h", (want(),)), Observed({("models", "m"): seen({"v1": have("v1")}, "v1")}))
    assert swap.previous == "v1"
    assert swap.describe("plan") == "would switch model m v2 to current (was v1)"
    assert swap.describe("apply") == "switching model m v2 to current (was v1)"


def test_fetch_describes_size_in_both_tenses() -> None:
    step = Step(Action.FETCH, "models", "qwen", "2024-09", size=988_000_000, files=3)
    assert step.describe("plan") == "would fetch model qwen 2024-09 (3 files, 988.0 MB)"
    assert step.describe("apply") == "fetching model qwen 2024-09 (3 files, 988.0 MB)"


GC_CASES = [
    ("keeps current and previous",
     seen({"v0": have("v0", at="1"), "v1": have("v1", at="2"), "v2": have("v2", at="3")}, "v2", "v1"), 2, frozenset(),
     {"v2": "retain", "v1": "retain", "v0": "remove"}),
    ("keep 1 drops previous",
     seen({"v1": have("v1"), "v2": have("v2")}, "v2", "v1"), 1, frozenset(), {"v2": "retain", "v1": "remove"}),
    ("keep 3 keeps the newest extra",
     seen({"a": have("a", at="1"), "b": have("b", at="2"), "c": have("c", at="3"), "v2": have("v2", at="4")}, "v2", "a"), 3, frozenset(),
     {"v2": "retain", "a": "retain", "c": "retain", "b": "remove"}),
    ("in use survives retention",
     seen({"v0": have("v0", at="1"), "v1": have("v1", at="2"), "v2": have("v2", at="3")}, "v2", "v1"), 1, frozenset({("models", "m", "v0")}),
     {"v2": "retain", "v1": "remove", "v0": "retain"}),
    ("declared but not yet current is kept",
     seen({"v1": have("v1", at="1"), "v2": have("v2", at="0")}, "v1"), 1, frozenset(), {"v1": "retain", "v2": "retain"}),
]


@pytest.mark.parametrize(("name", "seen_", "keep", "in_use", "expected"), GC_CASES, ids=[c[0] for c in GC_CASES])
def test_plan_gc(name: str, seen_: Seen, keep: int, in_use: frozenset[Any], expected: dict[str, str]) -> None:
    p = plan_gc(Desired("h", (want(),), keep), Observed({("models", "m"): seen_}, in_use))
    assert {s.version: s.action.value for s in p} == expected


def test_gc_removes_undeclared_artifacts_unless_in_use() -> None:
    observed = Observed(
        {("models", "old"): seen({"v1": have("v1")}, "v1", aid="old"), ("models", "busy"): seen({"v9": have("v9")}, "v9", aid="busy")},
        frozenset({("models", "busy", "v9")}),
    )
    p = plan_gc(Desired("h", (want(),)), observed)
    assert {(s.id, s.version): s.action for s in p} == {("busy", "v9"): Action.RETAIN, ("old", "v1"): Action.REMOVE}
    assert next(s for s in p if s.id == "old").reason == "no longer declared for this host"


def test_desired_for_host(index_doc: dict[str, Any]) -> None:
    idx = Index.model_validate(index_doc)
    d = desired_for_host(idx, "EDGE-1")
    assert [(w.kind, w.id) for w in d.wants] == [("models", "qwen"), ("loras", "review")]  # "available" qwen only once
    assert d.keep_versions == 2
    with pytest.raises(UsageError, match=r"host 'ghost' is not in the index \(hosts: edge-1, mini\)"):
        desired_for_host(idx, "ghost")


def _multi(index_doc: dict[str, Any]) -> Index:
    """edge-1 serves chat (eager) and mac (on demand), and keeps qwen available."""
    index_doc["hosts"]["edge-1"] = {"tenants": ["chat", "mac"], "available": ["qwen"]}
    index_doc["tenants"]["mac"]["fetch"] = "on-demand"
    return Index.model_validate(index_doc)


def test_desired_for_host_takes_every_served_tenant_but_leaves_on_demand_ones_to_their_first_request(index_doc: dict[str, Any]) -> None:
    d = desired_for_host(_multi(index_doc), "edge-1")
    assert [(w.kind, w.id) for w in d.wants] == [("models", "qwen"), ("loras", "review")]
    assert [(w.kind, w.id, w.version) for w in d.on_demand] == [("models", "llama", "1")]
    index_doc["tenants"]["mac"]["fetch"] = "eager"
    assert [(w.kind, w.id) for w in desired_for_host(Index.model_validate(index_doc), "edge-1").wants] == [
        ("models", "qwen"), ("loras", "review"), ("models", "llama")]


def test_an_artifact_an_eager_tenant_needs_is_fetched_even_if_an_on_demand_one_shares_it(index_doc: dict[str, Any]) -> None:
    index_doc["tenants"]["later"] = {"model": "qwen", "fetch": "on-demand"}
    index_doc["hosts"]["edge-1"] = {"tenants": ["later", "chat"]}
    d = desired_for_host(Index.model_validate(index_doc), "edge-1")
    assert [(w.kind, w.id) for w in d.wants] == [("models", "qwen"), ("loras", "review")] and d.on_demand == ()


def test_desired_for_tenant(index_doc: dict[str, Any]) -> None:
    idx = _multi(index_doc)
    assert [(w.kind, w.id) for w in desired_for_tenant(idx, "EDGE-1", "mac").wants] == [("models", "llama")]
    assert [(w.kind, w.id) for w in desired_for_tenant(idx, "edge-1", "chat").wants] == [("models", "qwen"), ("loras", "review")]
    with pytest.raises(UsageError, match=r"tenant 'mac' is not served by host 'edge-1' \(its tenants: chat\)"):
        desired_for_tenant(Index.model_validate({**index_doc, "hosts": {"edge-1": {"resident": "chat"}}}), "edge-1", "mac")
    with pytest.raises(UsageError, match=r"host 'ghost' is not in the index"):
        desired_for_tenant(idx, "ghost", "mac")


def test_gc_keeps_what_an_on_demand_tenant_fetched() -> None:
    llama = Want("models", "llama", "2", SRC, FILES)
    observed = Observed({("models", "llama"): Seen("models", "llama", {"1": have("1", at="1"), "2": have("2", at="2"),
                                                                       "0": have("0", at="0")}, "2", "1")})  # fmt: skip
    steps = {s.version: s.action.value for s in plan_gc(Desired("h", (want(),), 2, (llama,)), observed)}
    assert steps == {"2": "retain", "1": "retain", "0": "remove"}
    assert {s.action.value for s in plan_gc(Desired("h", (want(),)), observed)} == {"remove"}
    assert plan(Desired("h", (), 2, (llama,)), Observed()) == Plan(())  # apply fetches none of it


# -- reuse (issue #23): which published file each new file comes from -------------------------


def test_a_new_version_reuses_the_files_its_current_version_holds() -> None:
    observed = Observed({("models", "m"): seen({"v1": have("v1", frozenset({("a", SHA_A, 10), ("b", SHA_C, 20)}))}, "v1")})
    fetch = plan(Desired("h", (want(),)), observed).steps[0]
    assert [(r.path, r.origin) for r in fetch.reuse] == [("a", Origin("models", "m", "v1", "a"))]
    assert fetch.describe("plan") == "model m v2: would reuse 1 file (10 B) from model m v1; would fetch 1 file (20 B)"
    assert fetch.describe("apply") == "model m v2: reusing 1 file (10 B) from model m v1; fetching 1 file (20 B)"


def test_reuse_prefers_the_artifacts_own_current_version_and_skips_drifted_files() -> None:
    observed = Observed({
        ("models", "aaa"): seen({"x1": have("x1")}, "x1", aid="aaa"),
        ("models", "m"): seen({"v0": have("v0", drifted=("b (rewritten)",)), "v1": have("v1")}, "v1"),
    })  # fmt: skip
    assert {r.origin.version for r in plan(Desired("h", (want(),)), observed).steps[0].reuse} == {"v1"}
    drifted = Have("v1", PINS, ("a (rewritten)",), "2026", 30, drifted_paths=frozenset({"a"}))
    only = plan(Desired("h", (want(),)), Observed({("models", "m"): seen({"v1": drifted}, "v1")})).steps[0]
    assert [r.path for r in only.reuse] == ["b"]


def test_a_version_fetched_earlier_in_the_plan_is_an_origin_for_later_ones() -> None:
    steps = plan(Desired("h", (want(aid="first"), want(aid="second"))), Observed()).steps
    assert steps[0].reuse == ()
    assert {r.origin.id for r in steps[3].reuse} == {"first"} and len(steps[3].reuse) == 2
    assert steps[3].describe("plan") == "model second v2: would reuse 2 files (30 B) from model first v2; nothing to fetch"


def test_holdings_is_every_published_undrifted_copy() -> None:
    observed = Observed({("models", "m"): seen({"v1": have("v1"), "v2": have("v2", pins=None)}, "v1")})
    assert holdings(observed) == {(SHA_A, 10): (Origin("models", "m", "v1", "a"),), (SHA_B, 20): (Origin("models", "m", "v1", "b"),)}
