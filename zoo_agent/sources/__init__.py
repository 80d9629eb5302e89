"""Where artifact bytes come from: one small protocol, one module per source type.

A source only streams bytes; the store hashes them as it writes and decides whether they
are right. Foreign errors (OSError, HTTP) become ``SourceError`` here, so nothing above
this package sees them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from zoo_agent.errors import SourceError, Transient, UsageError
from zoo_agent.index import model as index

__all__ = ["ATTEMPTS", "CHUNK", "TOKEN_HELP", "FetchSettings", "Source", "Transient", "open_source", "resolve_token", "retried", "with_retries"]

log = logging.getLogger(__name__)
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
        try:
            token = path.read_text().strip()
        except FileNotFoundError:
            if path == token_file:
                raise UsageError(f"{path}: no such token file (--hf-token-file)") from None
            continue
        except OSError as exc:
            raise UsageError(f"{path}: cannot read the token file: {exc.strerror}") from exc
        if token:
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


def open_source(spec: index.Source, index_dir: Path, settings: FetchSettings) -> Source:
    if isinstance(spec, index.FileSource):
        from zoo_agent.sources.file import FileDir

        return FileDir(index_dir / spec.path)
    if isinstance(spec, index.UrlSource):
        if settings.offline:
            raise SourceError(f"{spec.base_url}: offline mode (--offline / HF_HUB_OFFLINE) forbids fetching over the network")
        from zoo_agent.sources.url import UrlFiles

        return UrlFiles(spec.base_url)
    if isinstance(spec, index.HfSource):
        from zoo_agent.sources.hf import HfRepo  # imports huggingface_hub: only when something must be fetched

        return HfRepo(spec.repo, spec.revision, settings)
    from zoo_agent.sources.ollama import OllamaDaemon  # imports the ollama client: only when something must be pulled

    return OllamaDaemon(spec, settings)
