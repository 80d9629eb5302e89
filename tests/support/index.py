"""A complete valid index to mutate (models, a LoRA, tenants of both backends, hosts), and its writer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

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


def write_index(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
