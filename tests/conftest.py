"""Shared fixtures: a complete valid index to mutate, and a clean environment."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

SHA_A = hashlib.sha256(b"a").hexdigest()
SHA_B = hashlib.sha256(b"b").hexdigest()
SHA_C = hashlib.sha256(b"c").hexdigest()
REV = "1f2e3d4c5b6a79880123456789abcdef01234567"

VALID_INDEX: dict[str, Any] = {
    "models": {
        "qwen": {
            "version": "2024-09",
            "source": {"type": "hf", "repo": "Qwen/Qwen2.5-0.5B-Instruct", "revision": REV},
            "files": [
                {"path": "config.json", "sha256": SHA_A, "size": 659},
                {"path": "model.safetensors", "sha256": SHA_B, "size": 988097824},
            ],
            "format": "safetensors",
            "license": "Apache-2.0",
        },
        "llama": {
            "version": "1",
            "source": {"type": "ollama", "name": "llama3.2:3b", "digest": "sha256:" + SHA_C},
            "format": "ollama",
            "license": "other",
        },
    },
    "loras": {
        "review": {
            "version": "v1",
            "source": {"type": "file", "path": "adapters/review"},
            "files": [{"path": "adapter_model.safetensors", "sha256": SHA_C, "size": 1024}],
            "license": "MIT",
            "base_model": "qwen",
            "rank": 8,
            "description": "Reviews diffs.",
            "tags": ["code"],
        }
    },
    "tenants": {
        "chat": {"model": "qwen", "loras": ["review"]},
        "mac": {"model": "llama", "backend": "ollama"},
    },
    "hosts": {
        "edge-1": {"resident": "chat", "available": ["qwen"]},
        "mini": {"resident": "mac"},
    },
}


@pytest.fixture
def index_doc() -> dict[str, Any]:
    """A fresh deep copy of a valid index, free to mutate."""
    return copy.deepcopy(VALID_INDEX)


def write_index(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No developer's HF_* / ZOO_* settings leak into a test."""
    import os

    for name in list(os.environ):
        if name.startswith(("HF_", "ZOO_", "HUGGING_FACE_")):
            monkeypatch.delenv(name)
    yield
