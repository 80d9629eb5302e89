"""What a resident and its workers run with: data only (uvicorn's config.py habit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AdapterConfig", "ResidentConfig", "RouteSessions", "SelectionConfig", "WorkerConfig"]


class AdapterConfig(BaseModel):
    """One declared adapter at its current version in the zoo (verified by the supervisor)."""

    model_config = ConfigDict(frozen=True)
    id: str
    version: str
    dir: Path
    rank: int
    description: str = ""
    tags: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.id}@{self.version}"


class SelectionConfig(BaseModel):
    """`<tenant>:auto`: an embedding model from the zoo, the least similarity that counts, and how
    many chosen adapters are composed, how (the index's adapter_selection; issue #21)."""

    model_config = ConfigDict(frozen=True)
    embedding_dir: Path
    embedding_label: str
    threshold: float = 0.7
    max_adapters: int = 3
    combine: Literal["sum", "weighted"] = "sum"


class RouteSessions(BaseModel):
    """A route this tenant answers for: where the route's sessions live, and who summarizes them (issue #21)."""

    model_config = ConfigDict(frozen=True)
    route: str
    dir: Path  # resident/routes/<route>/
    summarizer: str | None = None
    checkpoint_keep: int = 10  # its default tenant's sessions.checkpoints (issue #36)
    checkpoint_every: float | None = None


class WorkerConfig(BaseModel):
    """Sent to a worker over its control socket (so a secret never shows in argv)."""

    model_config = ConfigDict(frozen=True)
    tenant: str
    model: str
    version: str
    version_dir: Path
    allow_pickle: bool = False
    allow_code: bool = False
    device: str = "auto"
    dtype: str = "auto"
    defaults: dict[str, Any] = Field(default_factory=dict)
    max_queue: int = 16
    max_batch: int = 16  # sequences decoded together; 1 serves one generate() at a time
    stall_seconds: float = 60.0  # work in flight and no engine step for this long: the model hangs
    api_key: str | None = Field(default=None, repr=False)
    drain_seconds: float = 30.0
    memory_max: str | None = None  # the tenant's resources.memory_max
    adapters: tuple[AdapterConfig, ...] = ()
    refused_adapters: dict[str, str] = Field(default_factory=dict)  # id -> why it is not served
    max_loras: int = 8
    base_names: tuple[str, ...] = ()  # what adapter_config.json may call the base model
    selection: SelectionConfig | None = None
    sessions_dir: Path | None = None  # resident/tenants/<tenant>/: sessions/ and kv-cache/
    route_sessions: tuple[RouteSessions, ...] = ()
    checkpoint_keep: int = 10  # sessions.checkpoints (issue #36): kept per session, and every how many seconds one is taken on its own
    checkpoint_every: float | None = None
    router_socket: Path | None = None  # the router's private socket: how a worker asks another tenant (a summarizer)
    router_key: str | None = Field(default=None, repr=False)  # the resident's API key, for that socket
    backend: str = "transformers"  # or "ollama": the daemon at $OLLAMA_HOST runs ollama_model
    ollama_model: str | None = None
    health_interval: float = 5.0  # the ollama backend: how often the daemon's /api/ps is checked
    priority: int = 0  # the tenant's default class (resident/priority.py): lower is served first, as vLLM's
    aging_seconds: float = 10.0  # a waiting request gains one class per this many seconds: batch is never starved
    kind: Literal["generation", "embedding"] = "generation"  # the tenant's: an embedding worker serves /v1/embeddings (issue #36)


class ResidentConfig(BaseModel):
    model_config = ConfigDict(frozen=True)
    root: Path
    index: Path
    host: str
    listen: str = "127.0.0.1:8000"
    api_key_file: Path | None = None
    fleet_key_file: Path | None = None  # the key peers present and are presented (issue #22)
    priority_key_file: Path | None = None  # a client key that may also ask for classes above default (issue #31)
    peer_poll_seconds: float = 1.0  # how often each peer's /health and /v1/models are asked
    ping_interval: float = 1.0
    ping_timeout: float = 5.0
    measure_interval: float = 5.0  # how often each serving worker's memory is read (issue #34)
    max_crashes: int = 5
    crash_window: float = 60.0
    drain_seconds: float = 30.0
    watch_interval: float = 2.0  # how often `current` is checked for a new version
    strict: bool = False  # serve only the declared, verified versions (--strict, ZOO_STRICT=1)
    load_wait: float = 300.0  # how long a request waits for its tenant to fetch and load before a 503
    aging_seconds: float = 10.0  # a waiting request gains one priority class per this many seconds
    paging_policy: Literal["lru", "oldest"] = "lru"  # "oldest": the naive baseline the paging benchmark compares
