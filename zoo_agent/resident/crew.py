"""What the pager and the reloader ask of the supervisor (issue #32).

They decide what runs; the supervisor owns the processes and the loop. They are handed this
narrow face of it, as Ollama's scheduler is handed its ``loadFn``, so a unit test drives them
with a fake crew and no process.
"""

from __future__ import annotations

from typing import Protocol

from zoo_agent.index.model import Index
from zoo_agent.resident.config import WorkerConfig
from zoo_agent.resident.slots import Slot, Worker

__all__ = ["Crew"]


class Crew(Protocol):
    idx: Index | None  # the index the slot table follows

    @property
    def retiring(self) -> list[tuple[Slot, Worker]]:
        """Drained; reaped when they exit."""

    def start(self, slot: Slot, config: WorkerConfig, *, standby: bool = False, incoming: bool = False) -> None:
        """A worker for ``slot`` (verified first under ``--strict``, beside the loop): its serving
        one, or ``incoming`` beside the serving one (a reload)."""

    def preparing(self, slot: Slot) -> bool:
        """A worker of ``slot`` is being prepared (verified), not started yet."""

    def drain(self, slot: Slot, worker: Worker, why: str) -> None:
        """Let ``worker`` finish its requests and exit; it is retiring from now on."""

    def load_index(self) -> Index: ...

    def take_index(self, idx: Index) -> None: ...

    def reindex(self) -> None:
        """Take the loaded index again at the next tick (a fetched tenant's footprint is known now)."""

    def status_line(self) -> str: ...

    def wake(self) -> None: ...
