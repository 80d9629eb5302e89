"""An index with routes over three tenants of one model (and an embedder, an Ollama model), for the route rules."""

from __future__ import annotations

from typing import Any

from zoo_agent.index.model import Index


def routes_index(routes: dict[str, Any], host_routes: list[str], served: tuple[str, ...] = ("small", "large")) -> Index:
    return Index.model_validate(routes_document(routes, host_routes, served))


def routes_document(routes: dict[str, Any], host_routes: list[str], served: tuple[str, ...] = ("small", "large")) -> dict[str, Any]:
    file = {"path": "m.safetensors", "sha256": "a" * 64, "size": 1}
    ollama = {"type": "ollama", "name": "o:1", "digest": "sha256:" + "b" * 64}
    return {
        "models": {"m": {"version": "1", "source": {"type": "file", "path": "m"}, "files": [file], "license": "MIT"},
                   "e": {"version": "1", "source": {"type": "file", "path": "e"}, "files": [file], "license": "MIT"},
                   "o": {"version": "1", "source": ollama, "format": "ollama", "license": "MIT"}},
        "tenants": {t: {"model": "m"} for t in ("small", "large", "other")},
        "routes": routes,
        "hosts": {"h": {"tenants": list(served), "routes": host_routes}},
    }
