"""What a resident says it serves, and `zoo-agent fleet status` comparing that with the
fleet's index (issue #22): two real residents on 127.0.0.1, one an older version behind a
key, and an endpoint nobody listens on. Tiny models, real processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.resident import Resident, free_port
from tests.support.world import World
from zoo_agent.index.fit import context
from zoo_agent.index.load import load_index
from zoo_agent.resident.router.peers import tenant_digest

pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")

pytestmark = pytest.mark.resident


def _world(tmp: Path, version: str, files: dict[str, bytes]) -> World:
    tmp.mkdir()
    world = World(tmp)
    world.artifact("m", version, files)
    world.tenant = {"generation": {"temperature": 0, "max_tokens": 4}}
    world.write_index()
    assert world.run("apply").exit_code == 0
    return world


@pytest.fixture
def fleet(tmp_path: Path, tiny: dict[str, bytes]) -> Iterator[tuple[Resident, Resident, Path]]:
    """Host a serves m@v1 as the fleet pins it; host b still serves m@v0 and wants a key."""
    old = dict(tiny)
    old["config.json"] = tiny["config.json"].replace(b"{", b'{"_v": 0,', 1)
    a, b = _world(tmp_path / "a", "v1", tiny), _world(tmp_path / "b", "v0", old)
    (tmp_path / "key").write_text("fleet-secret\n")
    (tmp_path / "client-key").write_text("client-secret\n")  # b's clients' key: not the fleet's, which status sends
    residents = [Resident(a, "--fleet-key-file", str(tmp_path / "key")),
                 Resident(b, "--api-key-file", str(tmp_path / "client-key"), "--fleet-key-file", str(tmp_path / "key"))]
    try:
        for r in residents:
            r.notify.wait(lambda m: "READY" in m, timeout=180)
        doc = json.loads(a.index.read_text())
        doc["hosts"] = {"a": {"resident": "t", "endpoint": residents[0].url}, "b": {"resident": "t", "endpoint": residents[1].url},
                        "c": {"resident": "t", "endpoint": f"http://127.0.0.1:{free_port()}"}, "d": {"resident": "t"}}  # fmt: skip
        index = a.tmp / "fleet.json"
        index.write_text(json.dumps(doc))
        yield residents[0], residents[1], index
    finally:
        for r in residents:
            r.stop()


def test_v1_models_reports_the_model_and_the_digest_of_what_the_index_pins(fleet: tuple[Resident, Resident, Path]) -> None:
    import httpx

    a, _, index = fleet
    (card,) = httpx.get(a.url + "/v1/models", timeout=30).json()["data"]
    digest = tenant_digest(load_index(index), "t")  # the fleet's index pins what host a's own index pins
    assert digest == tenant_digest(load_index(a.world.index), "t")
    version = a.world.root / "models/m/versions/v1"
    facts = {"kind": "tenant", "version_digest": json.loads((version / "manifest.json").read_text())["digest"], "backend": "transformers",
             "task": "generate", "max_context": context(json.loads((version / "config.json").read_text())), "adapters": []}  # issue #36
    assert card == {"id": "t", "object": "model", "created": 0, "owned_by": "model-zoo", "root": "m@v1", "parent": None,
                    "x_zoo": {"state": "serving", "model": "m@v1", "digest": digest, **facts}}  # fmt: skip


def _status(world: World, *args: str) -> tuple[int, str]:
    result = world.raw("fleet", "status", *args)
    return result.exit_code, result.output


def test_fleet_status_names_the_wrong_version_and_the_unreachable(fleet: tuple[Resident, Resident, Path]) -> None:
    a, b, index = fleet
    code, out = _status(a.world, "--index", str(index), "--key-file", str(a.world.tmp.parent / "key"), "--json")
    assert code == 1, out
    document: dict[str, Any] = json.loads(out)
    rows = {r["host"]: r for r in document["tenants"]}
    assert document["ok"] is False and document["not_asked"] == ["d"]
    assert set(rows) == {"a", "b", "c"}
    assert rows["a"] == {"host": "a", "endpoint": a.url, "tenant": "t", "served": "m@v1", "pinned": "m@v1", "state": "ok",
                         "health": "ready", "error": None}  # fmt: skip
    assert (rows["b"]["served"], rows["b"]["state"]) == ("m@v0", "wrong version")
    assert rows["c"]["state"] == "unreachable" and rows["c"]["served"] is None and "refused" in rows["c"]["error"].lower()

    code, out = _status(a.world, "--index", str(index), "--key-file", str(a.world.tmp.parent / "key"))
    lines = out.splitlines()
    assert code == 1
    assert lines[0].split() == ["HOST", "TENANT", "SERVED", "PINNED", "STATE"]
    assert lines[1].split() == ["a", "t", "m@v1", "m@v1", "ok"]
    assert lines[2].split() == ["b", "t", "m@v0", "m@v1", "wrong", "version"]
    assert lines[3].startswith("c ") and "unreachable (" in lines[3]
    assert lines[4:] == ["fleet: 1 ok, 1 wrong version, 1 unreachable", "not asked (no endpoint): d"]


def test_without_the_fleet_key_a_guarded_host_is_unreachable_and_says_why(fleet: tuple[Resident, Resident, Path]) -> None:
    a, _, index = fleet
    code, out = _status(a.world, "--index", str(index), "--json")
    rows = {r["host"]: r for r in json.loads(out)["tenants"]}
    assert code == 1
    assert rows["a"]["state"] == "ok"
    assert rows["b"]["state"] == "unreachable" and rows["b"]["error"].startswith("/v1/models answered HTTP 401: missing or wrong bearer token")
    # b's clients' key is not the fleet key: status speaks as the fleet, so it is refused too.
    code, out = _status(a.world, "--index", str(index), "--key-file", str(a.world.tmp.parent / "client-key"), "--json")
    rows = {r["host"]: r for r in json.loads(out)["tenants"]}
    assert code == 1 and rows["b"]["state"] == "unreachable" and "401" in rows["b"]["error"]


def test_all_ok_exits_0(fleet: tuple[Resident, Resident, Path]) -> None:
    a, _, index = fleet
    doc = json.loads(index.read_text())
    doc["hosts"] = {"a": doc["hosts"]["a"]}
    index.write_text(json.dumps(doc))
    assert _status(a.world, "--index", str(index)) == (0, "HOST  TENANT  SERVED  PINNED  STATE\na     t       m@v1    m@v1    ok\nfleet: 1 ok\n")


def test_user_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.index.write_text(json.dumps({"hosts": {"a": {"endpoint": "http://a.lan:1/v1"}}}))
    code, out = _status(world, "--index", str(world.index))
    assert (code, out) == (2, f"{world.index}: /hosts/a/endpoint: must be a base URL with no path, query or fragment (write 'http://a.lan:1'), "
                              "got 'http://a.lan:1/v1'\n")  # fmt: skip
    world.index.write_text(json.dumps({"hosts": {"a": {}}}))
    assert _status(world, "--index", str(world.index)) == (2, f"{world.index}: no host declares an 'endpoint'; set hosts.<host>.endpoint for the hosts to ask\n")
    world.index.write_text(json.dumps({"hosts": {"a": {"endpoint": "http://a.lan:1"}}}))
    (tmp_path / "empty").write_text("")
    assert _status(world, "--index", str(world.index), "--key-file", str(tmp_path / "empty")) == (
        2, f"--key-file {tmp_path / 'empty'}: empty; it must hold the bearer token (an empty one would turn auth off)\n")
