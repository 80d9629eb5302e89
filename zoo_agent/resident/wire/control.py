"""The supervisor↔worker control protocol: one JSON object per line, typed (issue #20).

Every message is a pydantic model with a ``type`` tag; the two directions are discriminated
unions, and ``encode``/``Lines`` are the only framing, so neither side dispatches on which
key happens to be present. The worker's settings travel here too (never in argv: they may
hold a secret).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from zoo_agent.resident.config import AdapterConfig, WorkerConfig

__all__ = [
    "Adapters", "Configure", "Drain", "Failed", "Lines", "Loading", "Ping", "Pong", "Proceed", "Ready", "Reloads",
    "ToSupervisor", "ToWorker", "encode", "to_supervisor", "to_worker",
]  # fmt: skip


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# -- supervisor → worker ---------------------------------------------------------------------
class Configure(_Message):
    """The first message: what to load and serve."""

    type: Literal["configure"] = "configure"
    config: WorkerConfig


class Proceed(_Message):
    """Load the weights now: the memory budget has room. A worker starts its runtime (Python,
    torch) before this, beside an evicted worker that is still exiting, so a cold start
    overlaps the eviction; the weights wait for the memory (issue #20)."""

    type: Literal["proceed"] = "proceed"


class Ping(_Message):
    """Answered from the worker's event loop: a pong proves the loop runs (and the engine steps)."""

    type: Literal["ping"] = "ping"
    seq: int


class Drain(_Message):
    """Stop accepting, finish what is in flight, exit."""

    type: Literal["drain"] = "drain"


class Adapters(_Message):
    """New adapter versions after an apply: swapped in place between generations."""

    type: Literal["adapters"] = "adapters"
    adapters: tuple[AdapterConfig, ...]


class Reloads(_Message):
    """Reload totals for this tenant (only the supervisor knows them; the worker exports them)."""

    type: Literal["reloads"] = "reloads"
    ok: int
    failed: int


# -- worker → supervisor ---------------------------------------------------------------------
class Loading(_Message):
    type: Literal["loading"] = "loading"
    pct: int


class Failed(_Message):
    """Loading failed (deterministic: do not retry). An Ollama daemon away is no failure: the
    worker serves on, unavailable, and says so in its pongs (``Pong.unavailable``)."""

    type: Literal["failed"] = "failed"
    error: str


class Ready(_Message):
    """A real warm-up generation succeeded; what the model measured once loaded."""

    type: Literal["ready"] = "ready"
    pid: int
    load_seconds: float
    device: str
    dtype: str
    weights_bytes: int = 0  # parameters and buffers as loaded (their dtype, not the files')
    kv_bytes: int = 0  # the KV budget at the loaded dtype (max_batch sequences of max_context tokens)
    max_context: int | None = None  # prompt plus completion tokens it holds a request to (issue #33); None: it does not say


class Pong(_Message):
    type: Literal["pong"] = "pong"
    seq: int
    served: int = 0
    tokens: int = 0
    running: int = 0
    waiting: int = 0
    tps: float = 0.0
    adapters: list[str] = Field(default_factory=list)
    refused: dict[str, str] = Field(default_factory=dict)
    sessions: int = 0
    unavailable: str = ""  # why the tenant cannot answer now (its Ollama daemon is away, issue #35); "" when it can
    device_bytes: int | None = None  # device memory its allocator holds (None: not on a CUDA device); issue #34


ToWorker = Annotated[Configure | Proceed | Ping | Drain | Adapters | Reloads, Field(discriminator="type")]
ToSupervisor = Annotated[Loading | Failed | Ready | Pong, Field(discriminator="type")]
_to_worker: TypeAdapter[ToWorker] = TypeAdapter(ToWorker)
_to_supervisor: TypeAdapter[ToSupervisor] = TypeAdapter(ToSupervisor)


def encode(message: _Message) -> bytes:
    return message.model_dump_json().encode() + b"\n"


def to_worker(line: bytes) -> ToWorker:
    return _to_worker.validate_json(line)


def to_supervisor(line: bytes) -> ToSupervisor:
    return _to_supervisor.validate_json(line)


class Lines:
    """Reassembles lines from a non-blocking stream: ``feed`` returns the complete ones."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line for line in lines if line.strip()]

