"""`add hf:REPO --include '*q4_k_m.gguf'` pins one quantization of a GGUF repository, as format
'gguf', without fetching the others (issue #33)."""

from __future__ import annotations

import hashlib
import json

from collections.abc import Iterator

import pytest

from tests.support.hubserver import HubServer, Repo, serve
from tests.support.world import World

GGUF_REPO = {"Tiny-Q4_K_M.gguf": b"GGUF-q4" * 10, "Tiny-Q8_0.gguf": b"GGUF-q8" * 20, "Tiny-f32.gguf": b"GGUF-f32" * 40,
             "README.md": b"# tiny gguf"}  # fmt: skip


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with serve() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def test_add_pins_one_quantization_of_a_gguf_repository(world: World, hub: HubServer) -> None:
    commit = hub.repos.setdefault("org/tiny-gguf", Repo()).commit(GGUF_REPO)
    world.write_index()
    result = world.raw("add", "hf:org/tiny-gguf", "--id", "tiny-q4", "--include", "*q4_k_m.gguf", "--index", str(world.index))
    assert result.exit_code == 0, result.output
    entry = json.loads(world.index.read_text())["models"]["tiny-q4"]
    assert entry["format"] == "gguf"
    assert entry["files"] == [{"path": "Tiny-Q4_K_M.gguf", "size": 70, "sha256": hashlib.sha256(GGUF_REPO["Tiny-Q4_K_M.gguf"]).hexdigest()}]
    assert entry["source"] == {"type": "hf", "repo": "org/tiny-gguf", "revision": commit}
