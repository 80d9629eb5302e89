"""The supervisor's decisions with a real ``Supervisor`` that is never started (no socket, no
worker), ticked by hand (issues #20, #31): fetch on first use (what it fetches, how often, what
a failed fetch leaves behind), the metrics a tenant has from the moment it is known, and the
lease that carries over from one resident to the next.

The real verified fetch reads file sources; the router's own ``_place`` and ``_pump`` stand
for a request that arrives and its answer. Only spawning a worker is replaced: loading is
recorded instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("prometheus_client", reason="the resident extra is not installed (pip install -e .[resident])")

from zoo_agent.resident.config import ResidentConfig  # noqa: E402
from zoo_agent.resident.supervisor import Supervisor  # noqa: E402


def _model(tmp: Path, aid: str, version: str, data: bytes, *, sha: str | None = None) -> dict[str, Any]:
    src = tmp / "src" / aid / version
    src.mkdir(parents=True, exist_ok=True)
    (src / "weights.txt").write_bytes(data)
    return {"version": version, "source": {"type": "file", "path": str(src.relative_to(tmp))}, "license": "MIT",
            "files": [{"path": "weights.txt", "sha256": sha or hashlib.sha256(data).hexdigest(), "size": len(data)}]}  # fmt: skip


def _write(tmp: Path, od: dict[str, Any]) -> Path:
    doc = {"models": {"m": _model(tmp, "m", "v1", b"eager"), "od": od}, "loras": {},
           "tenants": {"a": {"model": "m"}, "lazy": {"model": "od", "fetch": "on-demand"}}, "hosts": {"h": {"tenants": ["a", "lazy"]}}}  # fmt: skip
    (tmp / "index.json").write_text(json.dumps(doc))
    return tmp / "index.json"


class Harness:
    """A supervisor ticked by hand, the fetches it started and the loads it asked for."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from zoo_agent.reconcile import ondemand

        self.root = tmp / "zoo"
        self.sup = Supervisor(ResidentConfig(root=self.root, index=tmp / "index.json", host="h"))
        self.sup.take_index(self.sup.load_index())
        self.fetches: list[float] = []
        self.loads: list[str] = []
        self.loop = asyncio.new_event_loop()
        real = ondemand.fetch_tenant

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.fetches.append(time.monotonic())
            return real(*args, **kwargs)

        monkeypatch.setattr(ondemand, "fetch_tenant", counted)
        def load(slot: Any, standby: bool = False) -> None:
            self.loads.append(slot.tenant)
            slot.phase = "loading"  # as the real one: a worker is spawned

        monkeypatch.setattr(self.sup.pager, "load", load)

    @property
    def slot(self) -> Any:
        return self.sup.slots["lazy"]

    def ask(self) -> asyncio.Task[str]:
        """A request for the on-demand tenant, as the router places it (it waits in the router's queue)."""
        task = self.loop.create_task(self.sup.router.admission.place("lazy", 2))
        self.loop.run_until_complete(asyncio.sleep(0))
        return task

    def answer(self, task: asyncio.Task[str]) -> BaseException | None:
        """What the router does when the supervisor pokes it: the waiter is answered."""
        self.sup.router.admission.pump("lazy")
        self.loop.run_until_complete(asyncio.sleep(0))
        assert task.done()
        return task.exception()

    def tick(self, rounds: int = 1) -> None:
        """The supervisor's loop, ``rounds`` times, each fetch it starts waited for (bounded)."""
        for _ in range(rounds):
            self.sup.tick()
            deadline = time.monotonic() + 30
            while self.slot.phase == "fetching" and time.monotonic() < deadline:
                time.sleep(0.01)
            assert self.slot.phase != "fetching", "a fetch of a few bytes took 30 s"

    def metrics(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.sup.router.metrics.registry).decode()

    def close(self) -> None:
        pending = asyncio.all_tasks(self.loop)
        for task in pending:  # requests still waiting: their clients leave
            task.cancel()

        async def settled() -> None:
            await asyncio.gather(*pending, return_exceptions=True)

        self.loop.run_until_complete(settled())
        self.loop.close()
        self.sup.router.similarity.close()
        self.sup.waker.close()
        self.sup.selector.close()


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    made: list[Harness] = []

    def make() -> Harness:
        made.append(Harness(tmp_path, monkeypatch))
        return made[-1]

    yield make
    for h in made:
        h.close()


def test_the_resident_fetches_what_its_loaded_index_pins_once_though_the_file_moved_on(tmp_path: Path, harness: Any) -> None:
    """The index file pins v2 before the resident reloaded: the resident still serves (and so fetches) v1,
    once; it never publishes a version its loaded index does not pin, and never fetches in a loop."""
    _write(tmp_path, _model(tmp_path, "od", "v1", b"one"))
    h = harness()
    _write(tmp_path, _model(tmp_path, "od", "v2", b"two"))  # edited, not reloaded
    h.ask()
    h.tick(10)
    assert len(h.fetches) == 1
    assert h.sup.zoo.read_link("models", "od", "current") == "v1"
    assert not h.sup.zoo.version_dir("models", "od", "v2").exists()
    assert h.loads == ["lazy"]


def test_a_fetch_that_leaves_something_else_current_is_a_failed_fetch_never_a_loop(tmp_path: Path, harness: Any,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Whatever the fetch did, one request causes one fetch: if the pinned version is still not
    current afterwards (another writer swapped it), the request is answered with why."""
    from zoo_agent.reconcile import ondemand

    _write(tmp_path, _model(tmp_path, "od", "v1", b"one"))
    h = harness()
    counted = ondemand.fetch_tenant

    def then_swapped(*args: Any, **kwargs: Any) -> Any:
        counted(*args, **kwargs)
        h.sup.zoo.version_dir("models", "od", "v9").mkdir(exist_ok=True)
        h.sup.zoo.swap_link("models", "od", "current", "v9")

    monkeypatch.setattr(ondemand, "fetch_tenant", then_swapped)
    request = h.ask()
    h.tick(10)
    assert len(h.fetches) == 1 and h.loads == []
    assert h.slot.phase == "failed" and "v9" in (h.slot.refusal or "")
    assert "v9" in str(h.answer(request))


def test_a_failed_fetch_stays_failed_until_a_request_or_the_index_asks_again(tmp_path: Path, harness: Any) -> None:
    _write(tmp_path, _model(tmp_path, "od", "v1", b"one", sha=hashlib.sha256(b"not one").hexdigest()))  # the source's bytes do not match the pin
    h = harness()
    assert 'zoo:on_demand_fetches_total{result="failed",tenant="lazy"} 0.0' in h.metrics()
    request = h.ask()
    h.tick()
    assert len(h.fetches) == 1 and h.slot.phase == "failed"
    # The supervisor's loop turns before the router has answered the request (it still counts as
    # waiting): that request caused the failed fetch, it is not a new one asking again.
    h.tick(3)
    assert len(h.fetches) == 1
    assert "sha256" in str(h.answer(request))
    h.tick(3)
    assert len(h.fetches) == 1
    for _ in range(3):  # `reload` (ExecReload) with no request: nothing is fetched, the failure stays shown
        h.sup.flags.add("hup")
        h.tick(3)
    assert len(h.fetches) == 1
    assert h.slot.phase == "failed"
    health = json.loads(h.sup.router.endpoints.health()[1])["tenants"]["lazy"]
    assert health["state"] == "failed" and "sha256" in health["error"]
    assert "lazy (fetch failed)" in h.sup.status_line()
    assert 'zoo:on_demand_fetches_total{result="failed",tenant="lazy"} 1.0' in h.metrics()
    # A new request asks again: exactly one more fetch, which fails the same way.
    request = h.ask()
    h.tick(3)
    assert len(h.fetches) == 2 and "sha256" in str(h.answer(request))
    h.tick(3)
    assert len(h.fetches) == 2
    # The index changes (the pin is corrected) and the resident reloads: the failure is forgotten,
    # and the next request fetches.
    _write(tmp_path, _model(tmp_path, "od", "v1", b"one"))
    h.sup.flags.add("hup")
    h.tick(3)
    assert len(h.fetches) == 2 and h.slot.phase == "paged_out" and not h.slot.error
    h.ask()
    h.tick(3)
    assert len(h.fetches) == 3 and h.loads == ["lazy"]
    assert h.sup.zoo.read_link("models", "od", "current") == "v1"
    assert 'zoo:on_demand_fetches_total{result="ok",tenant="lazy"} 1.0' in h.metrics()


# -- metrics a tenant has from the start ------------------------------------------------------------

def test_every_known_tenant_has_its_alerting_series_at_zero(tmp_path: Path, harness: Any) -> None:
    """``increase()`` sees a tenant's first restart, load and fetch only if the series existed at
    zero before it (a series born at 1 has no increase), and the load panel is not NaN."""
    _write(tmp_path, _model(tmp_path, "od", "v1", b"one"))
    h = harness()
    text = h.metrics()
    for tenant in ("a", "lazy"):
        for reason in ("crash", "hang"):
            assert f'zoo:worker_restarts_total{{reason="{reason}",tenant="{tenant}"}} 0.0' in text
        assert f'zoo:model_load_seconds_count{{tenant="{tenant}"}} 0.0' in text
        assert f'zoo:model_load_seconds_bucket{{le="+Inf",tenant="{tenant}"}} 0.0' in text
        assert f'zoo:model_evictions_total{{reason="budget",tenant="{tenant}"}} 0.0' in text
        assert f'zoo:router_retries_total{{tenant="{tenant}"}} 0.0' in text
    assert 'zoo:on_demand_fetches_total{result="ok",tenant="lazy"} 0.0' in text
    assert not [line for line in text.splitlines() if line.startswith("zoo:on_demand_fetches") and 'tenant="a"' in line]  # eager: never fetched here
    # A tenant a reload adds is known from that reload on.
    doc = json.loads((tmp_path / "index.json").read_text())
    doc["tenants"]["b"] = {"model": "m"}
    doc["hosts"]["h"]["tenants"].append("b")
    (tmp_path / "index.json").write_text(json.dumps(doc))
    h.sup.flags.add("hup")
    h.tick()
    assert 'zoo:worker_restarts_total{reason="crash",tenant="b"} 0.0' in h.metrics()


# -- the lease carries over ---------------------------------------------------------------------------

def _lease(h: Harness, tenant: str = "a") -> dict[str, Any]:
    return dict(json.loads((h.root / f"resident/tenants/{tenant}/lease.json").read_text()))


def test_the_lease_counts_across_residents(tmp_path: Path, harness: Any) -> None:
    _write(tmp_path, _model(tmp_path, "od", "v1", b"one"))
    first = harness()
    (first.root / "resident/tenants/a").mkdir(parents=True)
    slot = first.sup.slots["a"]
    slot.served_before, slot.tokens_before, slot.evictions = 3, 10, 1
    first.sup.reports.swaps["a"] = [{"time": "t0", "from": "v0", "to": "v1", "reason": "reload", "seconds": 1.5}]
    first.sup.reports.lease(slot)
    assert (_lease(first)["requests"], _lease(first)["tokens_generated"]) == (3, 10)
    since = _lease(first)["since"]

    second = harness()  # the next resident (a restart, a crash, a new boot)
    second.sup.reports.started_at = "a later start"
    slot = second.sup.slots["a"]
    slot.served_before, slot.tokens_before = 2, 5
    for _ in range(3):  # written again and again (every status change): counted once
        second.sup.reports.lease(slot)
    lease = _lease(second)
    assert (lease["requests"], lease["tokens_generated"], lease["evictions"]) == (5, 15, 1)
    assert lease["since"] == since and lease["resident_since"] == "a later start"
    assert [s["to"] for s in lease["swaps"]] == ["v1"]


@pytest.mark.parametrize(
    "damage",
    [b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe", b'{"requests": -5, "tokens_generated": "9", "evictions": true, "swaps": 7, "since": 3}',
     b'{"requests": 1e400}', b"[1, 2]", b"x" * (2 << 20), "fifo", "link"],
    ids=["deep", "not UTF-8", "wrong types", "huge number", "not an object", "too large", "a FIFO", "a link"],
)
def test_a_damaged_previous_lease_counts_nothing_and_is_replaced(tmp_path: Path, harness: Any, damage: bytes | str) -> None:
    import os

    from tests.support.victim import make_victim, snapshot

    _write(tmp_path, _model(tmp_path, "od", "v1", b"one"))
    h = harness()
    base = h.root / "resident/tenants/a"
    base.mkdir(parents=True)
    victim = make_victim(tmp_path / "victim")
    (victim / "lease.json").write_text('{"requests": 1000}')  # a lease of someone else's: never read through a link
    before = snapshot(victim)
    if damage == "fifo":
        os.mkfifo(base / "lease.json")
    elif damage == "link":
        (base / "lease.json").symlink_to(victim / "lease.json")
    else:
        assert isinstance(damage, bytes)
        (base / "lease.json").write_bytes(damage)
    slot = h.sup.slots["a"]
    slot.served_before = 2
    h.sup.reports.lease(slot)  # returns (a FIFO is never opened for a blocking read)
    lease = _lease(h)
    assert (lease["requests"], lease["tokens_generated"], lease["evictions"], lease["swaps"]) == (2, 0, 0, [])
    assert not (base / "lease.json").is_symlink()
    assert snapshot(victim) == before


def test_a_hostname_the_index_knows_by_its_short_name_serves(tmp_path: Path) -> None:
    """`apply` on a host named `H.lan` reconciles the index's `h` (plan.host_id); the resident
    resolves the same id once, so it starts, and its routes and peers are `h`'s (issue #32)."""
    _write(tmp_path, _model(tmp_path, "od", "v1", b"lazy"))
    sup = Supervisor(ResidentConfig(root=tmp_path / "zoo", index=tmp_path / "index.json", host="H.lan"))
    try:
        sup.take_index(sup.load_index())
        assert sup.host_id == "h"
        assert sup.order == ["a", "lazy"]
        assert sup.router.federation.host == "h"
    finally:
        sup.router.similarity.close()
        sup.waker.close()
        sup.selector.close()
