"""What every source shares: the ``Source`` protocol, fetch settings, bounded retries.

A module of its own so that ``sources/file.py``, ``hf.py``, ``url.py`` and ``ollama.py``
import it without importing the package's face, which imports them (issue #32).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from zoo_agent.errors import SourceError, Transient
from zoo_agent.keyfile import read_key_file

__all__ = ["ATTEMPTS", "CHUNK", "TOKEN_HELP", "FetchSettings", "Source", "Transient", "resolve_token", "retried", "with_retries"]

log = logging.getLogger("zoo_agent.sources")  # the package's name, as before the split
T = TypeVar("T")

ATTEMPTS = 4

CHUNK = 1 << 20  # 1 MiB: large enough that hashlib releases the GIL, small enough for flat RSS
TOKEN_HELP = "provide a token with --hf-token-file FILE, the systemd credential 'hf-token', or HF_TOKEN"


def with_retries(stream: Callable[[int], Iterator[bytes]], shown: str, offset: int = 0) -> Iterator[bytes]:
    """Stream from ``offset``; on ``Transient``, back off and continue from the byte
    reached (a Range request), a bounded number of times; then one ``SourceError`` line."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            for chunk in stream(offset):
                offset += len(chunk)
                yield chunk
            return
        except Transient as exc:
            _back_off(attempt, shown, str(exc), f"retrying from byte {offset}")


def retried(call: Callable[[], T], shown: str) -> T:
    """One request (a listing, a pin), with the same bounded retries as a stream."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except Transient as exc:
            _back_off(attempt, shown, str(exc), "retrying")
    raise AssertionError("unreachable: the last attempt raises")


def _back_off(attempt: int, shown: str, cause: str, what: str) -> None:
    if attempt == ATTEMPTS:
        raise SourceError(f"{shown}: {cause} (gave up after {ATTEMPTS} attempts)")
    delay = 0.5 * 2 ** (attempt - 1)
    log.warning("%s: %s; %s in %.1fs", shown, cause, what, delay)
    time.sleep(delay)


@dataclass(frozen=True)
class FetchSettings:
    """How sources reach the network. Kept free of huggingface_hub, whose import a no-op
    apply should not pay for."""

    hf_endpoint: str | None = None  # None: $HF_ENDPOINT, else the public hub
    hf_token: str | None = field(default=None, repr=False)  # repr=False: never in a log line
    offline: bool = False
    jobs: int = 4

    @classmethod
    def from_environment(cls, token_file: Path | None = None, offline: bool = False, jobs: int = 4) -> FetchSettings:
        return cls(
            hf_endpoint=os.environ.get("HF_ENDPOINT") or None,
            hf_token=resolve_token(token_file),
            offline=offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"),
            jobs=jobs,
        )


def resolve_token(token_file: Path | None) -> str | None:
    """--hf-token-file, then $CREDENTIALS_DIRECTORY/hf-token (systemd LoadCredential), then HF_TOKEN."""
    candidates = [token_file] if token_file else []
    if creds := os.environ.get("CREDENTIALS_DIRECTORY"):
        candidates.append(Path(creds) / "hf-token")
    for path in candidates:
        if path != token_file and not path.exists():
            continue  # no credential of that name: the next place a token may come from
        flag = "--hf-token-file" if path == token_file else "the systemd credential hf-token"
        if token := read_key_file(path, flag, allow_empty=True):  # the one key file reader (issue #31)
            return token
    return os.environ.get("HF_TOKEN") or None


class Source(Protocol):
    def describe(self) -> str:
        """Where the bytes come from, for messages (never a secret)."""
        ...

    def read(self, path: str, offset: int = 0) -> Iterator[bytes]:
        """Stream one file from ``offset`` on; raise ``SourceError`` if it cannot."""
        ...

    def prepare(self, item: Callable[[str, int], Callable[[int], None]]) -> None:
        """What must happen before files can be read (an Ollama pull); nothing by default.

        ``item(name, size)`` opens a progress item and returns its byte counter."""
        return None
