"""Remote tenants' pure parts and their slot (issue #36): the body a remote is sent, a poll's verdict,
the key file, the places a remote has, and a pager that never loads one."""

from __future__ import annotations

import asyncio
import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.index import VALID_INDEX
from zoo_agent.index.model import Index, RemoteEntry
from zoo_agent.resident.config import ResidentConfig, WorkerConfig
from zoo_agent.resident.pager import Pager
from zoo_agent.resident.router.remote import Remote, _key, listed, outgoing_body
from zoo_agent.resident.slots import Slot, SlotTable, Worker
from zoo_agent.store.zoo import Zoo

SPEC = RemoteEntry(base_url="https://api.example.com/v1", model="gpt-x", max_tokens=100)


def _sent(document: dict[str, Any], spec: RemoteEntry = SPEC, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    return json.loads(outgoing_body(document, spec, defaults or {}))  # type: ignore[no-any-return]


def test_the_body_names_the_remotes_model_caps_max_tokens_and_carries_none_of_our_fields() -> None:
    asked = {"model": "cloud", "messages": [{"role": "user", "content": "hi"}], "session": "s1", "priority": -2, "x_zoo": {"adapters": []},
             "temperature": 0.2, "tools": [{"type": "function"}]}  # fmt: skip
    sent = _sent(asked)
    assert sent == {"model": "gpt-x", "messages": asked["messages"], "temperature": 0.2, "tools": asked["tools"], "max_tokens": 100}
    assert _sent({"max_tokens": 5000})["max_tokens"] == 100 and _sent({"max_tokens": 7})["max_tokens"] == 7
    assert _sent({"max_completion_tokens": 900}) == {"model": "gpt-x", "max_completion_tokens": 100}  # no max_tokens added beside it
    assert _sent({"max_tokens": "many"})["max_tokens"] == "many"  # the remote's 400 to give
    assert _sent({"max_tokens": True})["max_tokens"] is True
    # The index's generation fields where the request names none, still under the cap.
    assert _sent({}, defaults={"max_tokens": 7, "temperature": 0}) == {"model": "gpt-x", "max_tokens": 7, "temperature": 0}
    assert _sent({"temperature": 1}, defaults={"max_tokens": 700, "temperature": 0}) == {"model": "gpt-x", "max_tokens": 100, "temperature": 1}
    assert _sent({}, spec=RemoteEntry(base_url="https://x.example/v1", model="m")) == {"model": "m"}  # no cap: the remote's own default
    with pytest.raises(ValueError):
        outgoing_body({"temperature": float("inf")}, SPEC, {})


@pytest.mark.parametrize(("status", "document", "said"), [
    (200, {"object": "list", "data": [{"id": "a"}, {"id": "gpt-x"}]}, ""),
    (200, {"data": [{"id": "gpt-x-2"}, {"id": 5}, "x", {"id": "b\x1b[31m"}]}, "does not list model 'gpt-x' (it lists 'gpt-x-2', 'b?[31m')"),
    (200, {"data": [{"id": f"m{i}"} for i in range(9)]}, "does not list model 'gpt-x' (it lists 'm0', 'm1', 'm2', 'm3', 'm4' and 4 more)"),
    (200, {"data": []}, "does not list model 'gpt-x' (it lists none)"),
    (200, None, "answered GET /models with no model list"),
    (200, [1, 2], "answered GET /models with no model list"),
    (200, {"data": {"id": "gpt-x"}}, "answered GET /models with no model list"),
    (401, None, "refused the tenant's key (401)"),
    (403, {"data": [{"id": "gpt-x"}]}, "refused the tenant's key (403)"),
    (302, None, "answered 302 to GET /models"),
    (503, None, "answered 503 to GET /models"),
])  # fmt: skip
def test_a_poll_says_why_the_remote_cannot_serve_the_model(status: int, document: Any, said: str) -> None:
    assert listed(status, document, "gpt-x") == said


def test_the_key_is_a_file_or_a_systemd_credential_and_never_one_of_the_residents_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "key").write_text("sk-remote\n")
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "openai").write_text("sk-cred\n")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    spec = SPEC.model_copy(update={"key_file": str(tmp_path / "key")})
    assert _key("cloud", spec, frozenset()) == ("sk-remote", "")
    assert _key("cloud", SPEC, frozenset()) == (None, "")  # none: no Authorization is sent
    named = SPEC.model_copy(update={"key_file": "openai"})
    key, why = _key("cloud", named, frozenset())
    assert key is None and why.startswith("tenants.cloud.remote.key_file 'openai' names a systemd credential, but") and "LoadCredential=openai:PATH" in why
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    assert _key("cloud", named, frozenset()) == ("sk-cred", "")
    key, why = _key("cloud", named, frozenset({"sk-cred"}))  # the same key as the clients', the peers' or the priority key
    assert key is None and "a key of the resident's own" in why and "sk-cred" not in why
    os.mkfifo(tmp_path / "fifo")
    key, why = _key("cloud", SPEC.model_copy(update={"key_file": str(tmp_path / "fifo")}), frozenset())
    assert key is None and why == f"tenants.cloud.remote.key_file {tmp_path / 'fifo'}: is a FIFO; a key file is a regular file holding one token"


def test_a_remotes_places_go_best_priority_first_and_a_client_that_left_gives_its_place_back() -> None:
    async def go() -> list[str]:
        remote = Remote("cloud", SPEC.model_copy(update={"max_concurrent": 1}), None, {}, 10.0)
        loop = asyncio.get_running_loop()
        never: asyncio.Future[None] = loop.create_future()
        assert await remote.turn(0, never, 1.0)  # the one place
        order: list[str] = []

        async def wait(name: str, priority: int, gone: asyncio.Future[None]) -> None:
            if await remote.turn(priority, gone, 5.0):
                order.append(name)
                remote.release()

        left: asyncio.Future[None] = loop.create_future()
        tasks = [asyncio.ensure_future(wait("batch", 1, never)), asyncio.ensure_future(wait("gone", -2, left)),
                 asyncio.ensure_future(wait("system", -2, never))]  # fmt: skip
        await asyncio.sleep(0.01)
        assert len(remote.waiting) == 3
        left.set_result(None)
        await asyncio.sleep(0.01)
        remote.release()
        await asyncio.gather(*tasks)
        assert remote.running == 0 and len(remote.waiting) == 0
        await remote.client.aclose()
        return order

    assert asyncio.run(go()) == ["system", "batch"]


# -- the pager never loads a remote tenant ----------------------------------------------------------
@dataclass
class _Crew:
    table: SlotTable
    idx: Index | None = None
    retiring: list[tuple[Slot, Worker]] = field(default_factory=list)
    started: list[str] = field(default_factory=list)

    def start(self, slot: Slot, config: WorkerConfig, *, standby: bool = False, incoming: bool = False) -> None:
        self.started.append(slot.tenant)

    def preparing(self, slot: Slot) -> bool:
        return False

    def drain(self, slot: Slot, worker: Worker, why: str) -> None:
        self.retiring.append((slot, worker))
        slot.serving = None

    def wake(self) -> None:
        pass

    def reindex(self) -> None:
        pass

    def status_line(self) -> str:
        return ""


class _Router:
    def known(self, tenant: str, on_demand: bool) -> None:
        pass

    def poke(self, tenant: str) -> None:
        pass


class _Reports:
    gap_from: dict[str, str] = {}

    def measured(self, tenant: str, label: str) -> int:
        return 0


class _Notify:
    def status(self, text: str) -> bool:
        return True


class _Launcher:
    def worker_config(self, idx: Index, tid: str) -> WorkerConfig:
        return WorkerConfig(tenant=tid, model=tid, version="v1", version_dir=Path("/zoo") / tid)


def test_a_remote_tenant_is_never_loaded_holds_no_memory_and_a_local_one_that_becomes_remote_is_drained(tmp_path: Path) -> None:
    doc = copy.deepcopy(VALID_INDEX)
    doc["tenants"]["cloud"] = {"backend": "openai", "remote": {"base_url": "https://api.example.com/v1", "model": "gpt-x", "max_concurrent": 3},
                               "resources": {"max_queue": 5}}  # fmt: skip
    doc["hosts"]["edge-1"] = {"tenants": ["cloud", "chat"], "memory_budget": "4G"}
    idx = Index.model_validate(doc)
    table = SlotTable()
    crew = _Crew(table, idx)
    config = ResidentConfig(root=tmp_path, index=tmp_path / "index.json", host="edge-1")
    pager = Pager(crew, table, config, Zoo(tmp_path), _Launcher(), _Router(), _Reports(), _Notify())  # type: ignore[arg-type]
    pager.take_index(idx, "edge-1")
    cloud = table.slots["cloud"]
    assert (cloud.remote, cloud.phase, cloud.footprint, cloud.capacity, cloud.pinned) == ("gpt-x at api.example.com", "loading", 0, 8, False)
    for slot in table.slots.values():
        slot.wanted = True  # requests wait for both
    pager.page(1.0)
    assert crew.started == ["chat"] and pager.live() == []  # the local one loads; the remote one needs nothing
    for phase in ("paged_out", "failed"):  # whatever its phase says (a reload's reset, say), nothing loads it
        cloud.phase = phase
        pager.page(1.5)
    assert crew.started == ["chat"]

    # The index makes `chat` remote: its worker is drained, and nothing loads it again.
    table.slots["chat"].serving = Worker(None, _Launcher().worker_config(idx, "chat"))  # type: ignore[arg-type]
    doc["tenants"]["chat"] = {"backend": "openai", "remote": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}
    pager.take_index(Index.model_validate(doc), "edge-1")
    chat = table.slots["chat"]
    assert [s.tenant for s, _ in crew.retiring] == ["chat"] and chat.remote == "m at 127.0.0.1:9" and chat.phase == "loading"
    chat.wanted = True
    pager.page(2.0)
    assert crew.started == ["chat"]


# -- the key as a systemd credential ----------------------------------------------------------------
def test_systemd_render_loads_a_remote_tenants_key_as_a_credential_and_refuses_our_own_names(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from zoo_agent.cli.main import cli

    runner = CliRunner()
    base = ["systemd", "render", "--index", str(tmp_path / "index.json"), "--exec", "/usr/bin/zoo-agent"]
    result = runner.invoke(cli, [*base, "--api-key-file", "/run/keys/api", "--credential", "openai-key=/run/secrets/openai key",
                                 "--credential", "vllm=/run/secrets/vllm"])  # fmt: skip
    assert result.exit_code == 0, result.output
    resident = result.output.split("### model-zoo-resident.service")[1].split("###")[0]
    assert [line for line in resident.splitlines() if line.startswith("LoadCredential=")] == [
        "LoadCredential=api-key:/run/keys/api", "LoadCredential=openai-key:/run/secrets/openai key", "LoadCredential=vllm:/run/secrets/vllm"]
    for bad, said in (("fleet-key=/run/k", "'fleet-key' is a credential of the resident's own"), ("a/b=/run/k", "is not a credential name"),
                      ("k=relative", "must be an absolute path"), ("k=/run/k\\", "trailing backslash"), ("k", "expected NAME=PATH")):  # fmt: skip
        result = runner.invoke(cli, [*base, "--credential", bad])
        assert result.exit_code == 2 and "--credential" in result.output and said in result.output, (bad, result.output)
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_fleet_status_compares_a_remote_tenant_by_its_name_at_the_remote() -> None:
    from zoo_agent.cli.fleet import Answer, fleet_rows
    from zoo_agent.resident.wire.documents import Card, CardZoo

    doc = copy.deepcopy(VALID_INDEX)
    doc["tenants"]["cloud"] = {"backend": "openai", "remote": {"base_url": "https://api.example.com/v1", "model": "gpt-x"}}
    doc["hosts"] = {"a": {"tenants": ["cloud"], "endpoint": "http://a.lan:8000"}}
    idx = Index.model_validate(doc)

    def state(card: Card | None, error: str | None = None) -> str:
        (row,) = fleet_rows(idx, {"a": Answer(cards={"cloud": card} if card else {}, error=error)})
        assert row["pinned"] == "gpt-x"
        return str(row["state"])

    card = Card(id="cloud", root="gpt-x", x_zoo=CardZoo(kind="tenant", state="serving", backend="openai"))
    assert state(card) == "ok"
    assert state(card.model_copy(update={"x_zoo": CardZoo(state="unavailable")})) == "unavailable"
    assert state(card.model_copy(update={"root": "gpt-y"})) == "wrong version"
    assert state(None) == "not served" and state(card, "refused") == "unreachable"


def test_a_remote_tenant_is_neither_loaded_nor_unloaded_by_hand() -> None:
    """``POST /models/load|unload`` (issue #34) answer a remote tenant at once: nothing of it is loaded here."""
    import httpx

    from zoo_agent.resident.router.manage import Manage

    table = SlotTable()
    table.slots["cloud"] = Slot("cloud", remote="gpt-x at api.example.com", phase="serving")
    manage = Manage(table, 5)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await manage(scope, (await receive()).get("body", b""), send)

    async def post(path: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://zoo") as client:
            return await client.post(path, json={"model": "cloud"})

    loaded, unloaded = asyncio.run(post("/models/load")), asyncio.run(post("/models/unload"))
    assert loaded.status_code == 200 and "is remote (gpt-x at api.example.com)" in loaded.json()["message"]
    assert unloaded.status_code == 409 and unloaded.json()["error"]["code"] == "remote"
    assert table.orders == []  # the pager was never asked
