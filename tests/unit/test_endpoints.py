"""The router's own documents from a slot table and an index (issues #32, #36): no process, no socket.

``/v1/models`` lists the host's tenants with what each can do (context, adapters, task,
backend, model@version, the whole-version digest apply recorded), their adapters, then the
host's routes with their tenants. The zoo is a real one, written by ``apply`` from file
sources, so the digest on a card is the one in the version's manifest.json.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

pytest.importorskip("prometheus_client", reason="the resident extra is not installed (pip install -e .[resident])")

from zoo_agent.cli.main import cli  # noqa: E402
from zoo_agent.index.load import load_index  # noqa: E402
from zoo_agent.index.model import Index  # noqa: E402
from zoo_agent.resident.router.admission import Admission  # noqa: E402
from zoo_agent.resident.router.endpoints import Endpoints, Metrics  # noqa: E402
from zoo_agent.resident.router.federation import Federation  # noqa: E402
from zoo_agent.resident.router.peers import tenant_digest  # noqa: E402
from zoo_agent.resident.router.upstream import Clients  # noqa: E402
from zoo_agent.resident.slots import Slot, SlotTable  # noqa: E402
from zoo_agent.store.zoo import Zoo  # noqa: E402

CONFIG = json.dumps({"model_type": "llama", "max_position_embeddings": 1024}).encode()


def _artifact(tmp: Path, aid: str, files: dict[str, bytes], **extra: Any) -> dict[str, Any]:
    src = tmp / "src" / aid
    src.mkdir(parents=True)
    for name, data in files.items():
        (src / name).write_bytes(data)
    pins = [{"path": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for name, data in files.items()]
    return {"version": "v1", "source": {"type": "file", "path": f"src/{aid}"}, "files": pins, "license": "MIT", **extra}


@pytest.fixture(scope="module")
def applied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Index, Zoo]:
    """Two tenants of one model (one declares its context), an adapter, ``:auto``, a route; applied."""
    tmp = tmp_path_factory.mktemp("endpoints")
    doc = {
        "models": {"m": _artifact(tmp, "m", {"config.json": CONFIG, "model.safetensors": b"weights"}),
                   "e": _artifact(tmp, "e", {"model.safetensors": b"embedder"})},
        "loras": {"code": _artifact(tmp, "code", {"adapter_model.safetensors": b"lora"}, base_model="m", rank=8, description="Writes code.")},
        "tenants": {"chat": {"model": "m", "loras": ["code"], "adapter_selection": {"embedding_model": "e"}},
                    "wide": {"model": "m", "resources": {"max_context": 32768}}},
        "routes": {"assistant": {"rules": [{"tenant": "wide", "when": {"min_words": 100}}], "default": "chat", "description": "Long ones go wide."}},
        "hosts": {"h": {"tenants": ["chat", "wide"], "routes": ["assistant"]}},
    }  # fmt: skip
    (tmp / "index.json").write_text(json.dumps(doc))
    result = CliRunner().invoke(cli, ["apply", "--root", str(tmp / "zoo"), "--index", str(tmp / "index.json"), "--host", "h"])
    assert result.exit_code == 0, result.output
    return load_index(tmp / "index.json"), Zoo(tmp / "zoo")


def _endpoints(idx: Index, zoo: Zoo) -> Endpoints:
    table = SlotTable(slots={t: Slot(t, phase="paged_out") for t in ("chat", "wide")}, order=["chat", "wide"])
    return Endpoints(table, Metrics(), Admission(table, aging_seconds=10.0, load_wait=5.0), Federation("h", None, Metrics().registry), Clients(),
                     is_ready=lambda: True, status_line=lambda: "2 tenants: none loaded", index=lambda: idx,
                     routes=lambda: {"assistant": idx.routes["assistant"]}, zoo=zoo)  # fmt: skip


def _recorded(zoo: Zoo, kind: str, aid: str) -> str:
    """The whole-version digest apply wrote into the version's manifest.json (issue #35)."""
    return str(json.loads((zoo.root / kind / aid / "versions" / "v1" / "manifest.json").read_text())["digest"])


def test_models_lists_tenants_with_capabilities_then_routes_with_their_tenants(applied: tuple[Index, Zoo]) -> None:
    idx, zoo = applied
    cards = _endpoints(idx, zoo).models()
    head = {"object": "model", "created": 0, "owned_by": "model-zoo"}
    model_digest = _recorded(zoo, "models", "m")
    assert model_digest.startswith("sha256:")
    assert cards == [
        {"id": "chat", **head, "root": "m@v1", "parent": None,
         "x_zoo": {"kind": "tenant", "state": "paged_out", "model": "m@v1", "digest": tenant_digest(idx, "chat"), "version_digest": model_digest,
                   "backend": "transformers", "task": "generate", "max_context": 1024, "adapters": ["chat:code", "chat:auto"]}},
        {"id": "chat:code", **head, "root": "code@v1", "parent": "chat",
         "x_zoo": {"kind": "adapter", "state": "paged_out", "version_digest": _recorded(zoo, "loras", "code")}},
        {"id": "chat:auto", **head, "root": "chosen per request", "parent": "chat", "x_zoo": {"kind": "adapter", "state": "paged_out"}},
        {"id": "wide", **head, "root": "m@v1", "parent": None,
         "x_zoo": {"kind": "tenant", "state": "paged_out", "model": "m@v1", "digest": tenant_digest(idx, "wide"), "version_digest": model_digest,
                   "backend": "transformers", "task": "generate", "max_context": 1024, "adapters": []}},  # declared 32768: the model's 1024 positions bound it (issue #33)
        {"id": "assistant", **head, "root": "assistant", "parent": None,
         "x_zoo": {"kind": "route", "tenants": ["wide", "chat"], "description": "Long ones go wide."}},
    ]  # fmt: skip


def test_the_version_digest_is_read_from_the_zoo_once_not_per_request(applied: tuple[Index, Zoo]) -> None:
    idx, zoo = applied
    endpoints = _endpoints(idx, zoo)
    first = endpoints.models()
    manifest = zoo.root / "models" / "m" / "versions" / "v1" / "manifest.json"
    mode = manifest.stat().st_mode
    manifest.chmod(0o600)
    saved = manifest.read_bytes()
    try:
        manifest.write_text("{}")  # a published version never changes: what was read stands
        assert endpoints.models() == first
        assert _endpoints(idx, zoo).models()[0]["x_zoo"]["version_digest"] is None  # a fresh router reads again: nothing readable
    finally:
        manifest.write_bytes(saved)
        manifest.chmod(mode)


def test_a_tenant_not_fetched_yet_has_no_digest_and_no_known_context(applied: tuple[Index, Zoo], tmp_path: Path) -> None:
    idx, _ = applied
    (card, *_) = _endpoints(idx, Zoo(tmp_path / "empty")).models()
    assert (card["x_zoo"]["version_digest"], card["x_zoo"]["max_context"]) == (None, None)


def test_health_is_the_typed_document_and_round_trips(applied: tuple[Index, Zoo]) -> None:
    from zoo_agent.resident.wire.documents import Health, dump, parse

    idx, zoo = applied
    endpoints = _endpoints(idx, zoo)
    endpoints.table.slots["wide"].phase, endpoints.table.slots["wide"].fetch_pct = "fetching", 40
    endpoints.table.slots["chat"].error = "failed to load"
    status, body = endpoints.health()
    assert status == 200
    document = json.loads(body)
    assert document["tenants"]["wide"]["fetch_pct"] == 40 and "error" not in document["tenants"]["wide"]  # only while fetching / when failed
    assert document["tenants"]["chat"]["error"] == "failed to load" and "fetch_pct" not in document["tenants"]["chat"]
    assert dump(parse(Health, body, limit=1 << 20)) == document
