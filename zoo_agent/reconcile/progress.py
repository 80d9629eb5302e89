"""Progress for long fetches: bars on a terminal, plain log lines under systemd or --json."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from zoo_agent.formats import human_bytes
from zoo_agent.systemd.notify import Notifier

__all__ = ["Progress", "make_progress"]

log = logging.getLogger("zoo_agent")

LOG_EVERY_S = 5.0


class Progress:
    """Plain lines, at most one every few seconds per item: what the journal should hold.

    Under systemd the same line becomes the unit's ``Status:`` (sd_notify STATUS=), so
    `systemctl status model-zoo-reconcile` shows how far a long download got.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.notifier = Notifier()

    def item(self, label: str, size: int) -> Callable[[int], None]:
        done, last = 0, time.monotonic()
        self.notifier.status(f"fetching {label} ({human_bytes(size)}); {self._overall()}")

        def advance(n: int) -> None:
            nonlocal done, last
            done += n
            self.done += n
            t = time.monotonic()
            if t - last >= LOG_EVERY_S and size:
                last = t
                line = f"{label}: {100 * done // size}% ({human_bytes(done)} of {human_bytes(size)})"
                log.info("%s", line)
                self.notifier.status(f"fetching {line}; {self._overall()}")

        return advance

    def _overall(self) -> str:
        return f"{human_bytes(self.done)} of {human_bytes(self.total)} in all"

    def close(self) -> None:
        pass


class _Bars(Progress):
    """One overall bar and one for the file being fetched (tqdm comes with huggingface_hub)."""

    def __init__(self, total: int) -> None:
        super().__init__(total)
        from tqdm import tqdm

        self._tqdm = tqdm
        self.overall: Any = tqdm(total=total, unit="B", unit_scale=True, desc="total", position=0, file=sys.stderr)

    def item(self, label: str, size: int) -> Callable[[int], None]:
        bar = self._tqdm(total=size, unit="B", unit_scale=True, desc=label[-40:], position=1, leave=False, file=sys.stderr)

        def advance(n: int) -> None:
            bar.update(n)
            self.overall.update(n)
            if bar.n >= size:
                bar.close()

        return advance

    def close(self) -> None:
        self.overall.close()


def make_progress(total: int, *, machine_output: bool) -> Progress:
    interactive = sys.stderr.isatty() and "JOURNAL_STREAM" not in os.environ and not machine_output
    return _Bars(total) if interactive and total else Progress(total)
