"""A fleet index of four hosts (peers, overflow, accept_from_peers), and the check that reads it."""

from __future__ import annotations

import copy
from typing import Any

from tests.support.index import SHA_A, SHA_B, SHA_C
from zoo_agent.index.load import check_document
from zoo_agent.index.model import Index


def _model(version: str, sha: str = SHA_A) -> dict[str, Any]:
    return {"version": version, "source": {"type": "file", "path": "m"}, "files": [{"path": "model.safetensors", "sha256": sha, "size": 10}],
            "license": "MIT"}  # fmt: skip


FLEET: dict[str, Any] = {
    "models": {"small": _model("v1"), "large": _model("v2", SHA_B)},
    "loras": {"sql": {**_model("1", SHA_C), "base_model": "small", "rank": 4}},
    "tenants": {"chat": {"model": "small", "loras": ["sql"]}, "big": {"model": "large", "overflow": "peers"}},
    "hosts": {
        "thor": {"tenants": ["chat", "big"], "endpoint": "http://thor.lan:8000", "accept_from_peers": ["chat", "big"]},
        "sprout": {"tenants": ["chat"], "endpoint": "http://sprout.lan:8000", "accept_from_peers": ["chat"]},
        "legion": {"tenants": ["big"], "endpoint": "https://10.0.0.7:8443", "accept_from_peers": ["big"]},
        "edge": {"tenants": ["chat"]},  # serves, no endpoint: never anyone's peer
    },
}


def fleet() -> dict[str, Any]:
    return copy.deepcopy(FLEET)


def fleet_index(doc: dict[str, Any]) -> Index:
    idx, problems = check_document(doc)
    assert problems == [] and idx is not None
    return idx
