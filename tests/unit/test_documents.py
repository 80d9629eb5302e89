"""The documents that cross processes and hosts (issue #32): each round-trips from its producer to
its reader; a reader tolerates what a newer resident adds, and refuses a field of the wrong type
with one line naming the field (a JSON pointer, no class name).

Peers are fed real httpx responses through httpx's MockTransport; ``state.json`` is written by
the real ``Reports`` and read by the real commands.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

pytest.importorskip("prometheus_client", reason="the resident extra is not installed (pip install -e .[resident])")

import httpx  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from zoo_agent.cli.main import cli  # noqa: E402
from zoo_agent.resident.router.federation import Federation  # noqa: E402
from zoo_agent.resident.router.peers import Peer  # noqa: E402

PEER = Peer("b", "big", "http://b.test:8000", "m2@v1", "sha256:" + "ab" * 32)
OTHER = Peer("c", "big", "http://c.test:8000", "m2@v1", PEER.digest)
CARD = {"id": "big", "object": "model", "root": PEER.model, "x_zoo": {"state": "serving", "model": PEER.model, "digest": PEER.digest}}
HEALTH = {"state": "ready", "tenants": {"big": {"running": 2, "waiting": 1}}}


def _host(models: Any, health: Any) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=health if request.url.path == "/health" else models)

    return handler


def _polled(*hosts: tuple[Peer, Callable[[httpx.Request], httpx.Response]]) -> Federation:
    fed = Federation("a", "fleet-secret", CollectorRegistry())
    fed.table = {"big": [p for p, _ in hosts]}
    for peer, handler in hosts:
        fed.clients[peer.endpoint] = httpx.AsyncClient(base_url=peer.endpoint, transport=httpx.MockTransport(handler))

    async def run() -> None:
        await fed.poll()
        await fed.close()

    asyncio.run(run())
    return fed


# -- peers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("models", "health", "reason"), [
    ({"data": [{**CARD, "x_zoo": {**CARD["x_zoo"], "digest": 5}}]}, HEALTH, "/v1/models: /data/0/x_zoo/digest: expected a string, got a number"),
    ({"data": [5]}, HEALTH, "/v1/models: /data/0: expected an object, got a number"),
    ({"data": {"big": CARD}}, HEALTH, "/v1/models: /data: expected a list, got an object"),
    ({"data": [CARD]}, {"tenants": {"big": {"running": "2"}}}, "/health: /tenants/big/running: expected an integer, got a string"),
    ({"data": [CARD]}, {"tenants": {"big": {"waiting": True}}}, "/health: /tenants/big/waiting: expected an integer, got a boolean"),
    ({"data": [CARD]}, {"tenants": {"big\x1b[2J/x": {"waiting": -100}}}, "/health: /tenants/big\\x1b[2J~1x/waiting: expected at least 0, got -100"),
    ({"data": [CARD]}, {"status": ["a"]}, "/health: /status: expected a string, got a list"),
])  # fmt: skip
def test_a_peer_document_with_a_field_of_the_wrong_type_refuses_the_peer_naming_the_field(models: Any, health: Any, reason: str) -> None:
    fed = _polled((PEER, _host(models, health)))
    assert fed.candidates("big") == []
    said = fed.report()["b"]
    assert (said["state"], said["reason"]) == ("refused", f"malformed answer ({reason})")
    assert "\n" not in said["reason"] and "\x1b" not in said["reason"]
    assert not any(name in said["reason"] for name in ("Card", "Health", "ModelList", "model_type", "pydantic"))


def test_a_peer_claiming_negative_load_is_not_picked_before_an_honest_one() -> None:
    """Busy is "running + waiting": a peer that says it has -100 waiting must not jump the queue."""
    honest = _host({"data": [CARD]}, {"tenants": {"big": {"running": 1, "waiting": 0}}})
    liar = _host({"data": [CARD]}, {"tenants": {"big": {"running": 0, "waiting": -100}}})
    fed = _polled((PEER, honest), (OTHER, liar))
    assert fed.candidates("big") == [PEER]


def test_what_a_newer_peer_adds_is_ignored_and_what_an_older_one_lacks_is_no_fault() -> None:
    newer = {**CARD, "max_model_len": 8192, "permission": [{"id": "x"}],
             "x_zoo": {**CARD["x_zoo"], "kind": "tenant", "quantization": {"bits": 4}, "modalities": ["text", "image"]}}  # fmt: skip
    health = {"state": "ready", "uptime": 12.5, "tenants": {"big": {"running": 1, "waiting": 1, "gpu": {"util": 0.5}}}, "peers": {}}
    fed = _polled((PEER, _host({"object": "list", "data": [newer, {"id": "next-kind", "x_zoo": {"kind": "embedder"}}]}, health)))
    assert fed.candidates("big") == [PEER] and fed.health.busy[PEER.key] == 2
    older = _polled((PEER, _host({"data": [CARD]}, {"state": "ready"})))  # no tenants in /health: idle
    assert older.candidates("big") == [PEER] and older.health.busy[PEER.key] == 0


# -- round trips -----------------------------------------------------------------------------------
def test_a_worker_answers_x_zoo_round_trips() -> None:
    from zoo_agent.resident.engine.base import Generated, Request
    from zoo_agent.resident.sessions.store import Turn
    from zoo_agent.resident.wire.documents import AnswerZoo, dump, validate
    from zoo_agent.resident.worker.responses import _x_zoo

    request = Request(None, "hi", 4, 0.0, 1.0, adapter=":auto", session=Turn("s1", [], dropped_turns=1, cache="restored", cached_tokens=12))
    result = Generated(adapter="a+b", similarity=0.812345, combine="sum",
                       adapters=[{"id": "a", "version": "1", "similarity": 0.81}, {"id": "b", "version": "2", "similarity": 0.7, "weight": 0.45}])  # fmt: skip
    x_zoo = _x_zoo(request, result)["x_zoo"]
    assert x_zoo == {"adapter": "a+b", "similarity": 0.8123, "combine": "sum", "session": {"id": "s1", "cache": "restored", "cached_tokens": 12, "dropped_turns": 1},
                     "adapters": [{"id": "a", "version": "1", "similarity": 0.81}, {"id": "b", "version": "2", "similarity": 0.7, "weight": 0.45}]}  # fmt: skip
    assert dump(validate(AnswerZoo, json.loads(json.dumps(x_zoo)))) == x_zoo
    plain = _x_zoo(Request(None, "hi", 4, 0.0, 1.0, adapter="code"), Generated(adapter="code@1"))
    assert plain == {"x_zoo": {"adapter": "code@1"}}  # no similarity, no composition, no session: absent, not null
    assert _x_zoo(Request(None, "hi", 4, 0.0, 1.0), Generated()) == {}


def _reports(tmp_path: Path) -> Any:
    from zoo_agent.resident.reports import Outlook, Reports
    from zoo_agent.resident.slots import Slot, SlotTable
    from zoo_agent.store.zoo import Zoo

    table = SlotTable(slots={"a": Slot("a", pinned=True, phase="paged_out", error="did not fit"), "b": Slot("b", phase="fetching")},
                      order=["a", "b"], budget=1 << 30)  # fmt: skip
    outlook = Outlook(attempts=2, reloads=1, last_error="", state="ready", swapped=["a"], listen="127.0.0.1:8000")
    return Reports(table, Zoo(tmp_path / "zoo"), lambda: outlook, lambda: "")


def test_state_json_round_trips_from_the_supervisors_reports_to_status(tmp_path: Path) -> None:
    from zoo_agent.resident.reports import read_state, resident_status
    from zoo_agent.resident.wire.documents import dump

    reports = _reports(tmp_path)
    reports.state()
    written = json.loads(reports.zoo.resident_state.read_text())
    assert set(written) == {"pid", "attempts", "reloads", "last_error", "state", "version", "swapped", "listen", "budget", "status", "updated", "tenants"}
    assert written["tenants"]["a"] == {"state": "paged_out", "model": None, "version": None, "pid": None, "pinned": True, "footprint": 0,
                                       "running": 0, "waiting": 0, "last_used": None, "error": "did not fit"}  # fmt: skip
    state = read_state(reports.zoo.resident_state)
    assert state is not None and dump(state) == written
    status = resident_status(reports.zoo)
    assert status is not None and status["running"] and status["tenants"] == written["tenants"]


def _index(tmp_path: Path) -> Path:
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"models": {}, "tenants": {}, "hosts": {"h": {}}}))
    return index


def test_a_state_json_no_resident_wrote_is_one_line_naming_the_field(tmp_path: Path) -> None:
    reports = _reports(tmp_path)
    reports.state()
    state = json.loads(reports.zoo.resident_state.read_text())
    state["tenants"]["a"]["running"] = "many"
    state["written_by"] = "a newer resident"  # tolerated
    reports.zoo.resident_state.write_text(json.dumps(state))
    args = ["--root", str(reports.zoo.root), "--index", str(_index(tmp_path)), "--host", "h"]
    line = f"{reports.zoo.resident_state}: not a resident's state (/tenants/a/running: expected an integer, got a string)\n"
    status = CliRunner().invoke(cli, ["status", *args])
    assert status.exit_code == 0 and status.stderr == line  # the zoo's own state still shows
    assert status.stdout.startswith("host h, zoo ")
    reload = CliRunner().invoke(cli, ["resident", *args, "reload", "--timeout", "1"])
    assert (reload.exit_code, reload.stderr) == (1, line)


def test_what_a_newer_resident_adds_to_state_json_is_ignored(tmp_path: Path) -> None:
    from zoo_agent.resident.reports import resident_status

    reports = _reports(tmp_path)
    reports.state()
    state = json.loads(reports.zoo.resident_state.read_text())
    state["engines"], state["tenants"]["a"]["engine"] = ["llama.cpp"], "llama.cpp"
    reports.zoo.resident_state.write_text(json.dumps(state))
    status = resident_status(reports.zoo)
    assert status is not None and status["tenants"]["a"]["error"] == "did not fit" and "engine" not in status["tenants"]["a"]
