"""An Ollama daemon as a source (issue #11): pulled through the official `ollama` client.

The daemon keeps the blobs, so there are no files for the store to stage: `prepare` pulls
`name:tag` (progress into ours), then compares the digest the daemon reports with the one
the index pins. A tag that moved is an IntegrityError naming both digests, and nothing is
published. Failures end in one line after bounded retries (`retried`): unreachable
daemon, unknown model, a daemon too old for the model, a stalled pull.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from zoo_agent.errors import IntegrityError, SourceError
from zoo_agent.index import model as index
from zoo_agent.sources.base import FetchSettings, Source, Transient, retried

__all__ = ["OllamaDaemon", "daemon_host", "daemon_has"]

STALL_SECONDS = 60.0  # a pull that sends nothing for this long is retried


def daemon_host() -> str | None:
    """$OLLAMA_HOST, as the ollama client and daemon read it (None: the client's default, 127.0.0.1:11434)."""
    return os.environ.get("OLLAMA_HOST") or None


def daemon_has(pins: dict[str, str], timeout: float = 5.0) -> dict[str, bool]:
    """For each ``name[:tag]`` → pinned digest: whether the daemon holds exactly that digest now.

    One ``/api/tags`` for all of them (issue #35: a model deleted from the daemon was not
    noticed by ``status``, ``verify`` or ``apply``). ``SourceError`` when the daemon does not
    answer: a caller decides whether that is drift or only unknown."""
    import httpx
    import ollama

    client = ollama.Client(host=daemon_host(), timeout=timeout)
    try:
        models = client.list().models
    except (ConnectionError, httpx.HTTPError):
        raise SourceError(f"no Ollama daemon answers at {daemon_host() or '127.0.0.1:11434'} (OLLAMA_HOST)") from None
    except ollama.ResponseError as exc:
        raise SourceError(f"the Ollama daemon at {daemon_host() or '127.0.0.1:11434'}: HTTP {exc.status_code}: {exc.error}") from None
    finally:
        client.close()  # type: ignore[no-untyped-call]
    held = {m.model: f"sha256:{m.digest}" for m in models if m.model and m.digest}
    return {name: held.get(name if ":" in name else f"{name}:latest") == digest for name, digest in pins.items()}


class OllamaDaemon(Source):
    def __init__(self, spec: index.OllamaSource, settings: FetchSettings) -> None:
        self.name = spec.name if ":" in spec.name else f"{spec.name}:latest"
        self.pin = spec.digest
        self.settings = settings
        self.host = daemon_host()

    def describe(self) -> str:
        return f"ollama:{self.name}"

    def read(self, path: str, offset: int = 0) -> Iterator[bytes]:
        raise SourceError(f"{self.describe()}: the Ollama daemon keeps the model's blobs; there is no file '{path}' to read")

    def prepare(self, item: Callable[[str, int], Callable[[int], None]]) -> None:
        """Pull (unless offline), then check the digest the daemon reports against the pin."""
        import ollama

        client = ollama.Client(host=self.host, timeout=STALL_SECONDS)
        try:
            if not self.settings.offline:
                retried(lambda: self._pull(client, item), self.describe())
            actual = self._digest(client)
        finally:
            client.close()  # type: ignore[no-untyped-call]
        if actual is None:
            raise SourceError(f"{self.describe()}: the daemon does not have it" + (" (offline mode: no pull was attempted)" if self.settings.offline else ""))
        if actual != self.pin:
            raise IntegrityError(f"{self.describe()}: the daemon has digest {actual}, the index pins {self.pin}; the tag moved: "
                                 "check the new model, then pin its digest", file=self.name, expected=self.pin, actual=actual)  # fmt: skip

    def _pull(self, client: object, item: Callable[[str, int], Callable[[int], None]]) -> None:
        import httpx
        import ollama

        bars: dict[str, tuple[Callable[[int], None], list[int]]] = {}
        try:
            for part in client.pull(self.name, stream=True):  # type: ignore[attr-defined]
                if part.digest and part.total:
                    advance, done = bars.setdefault(part.digest, (item(f"{self.name} {part.digest[7:19]}", part.total), [0]))
                    if part.completed and part.completed > done[0]:
                        advance(part.completed - done[0])
                        done[0] = part.completed
        except (ConnectionError, httpx.ConnectError):  # the client wraps some connect errors, not those of a stream
            raise Transient(f"no Ollama daemon answers at {self.host or '127.0.0.1:11434'} (OLLAMA_HOST)") from None
        except httpx.TimeoutException:
            raise Transient(f"the pull stalled (nothing for {STALL_SECONDS:g}s)") from None
        except ollama.ResponseError as exc:
            if exc.status_code == 404 or "file does not exist" in exc.error:
                raise SourceError(f"{self.describe()}: the registry does not know this model ({exc.error})") from None
            if exc.status_code == 412 or "newer version" in exc.error:
                raise SourceError(f"{self.describe()}: the daemon is too old for this model; upgrade Ollama ({exc.error})") from None
            if exc.status_code >= 500 or exc.status_code == 429:
                raise Transient(f"HTTP {exc.status_code}: {exc.error}") from None
            raise SourceError(f"{self.describe()}: HTTP {exc.status_code}: {exc.error}") from exc

    def _digest(self, client: object) -> str | None:
        import httpx
        import ollama

        try:
            models = client.list().models  # type: ignore[attr-defined]
        except (ConnectionError, httpx.ConnectError):
            raise SourceError(f"{self.describe()}: no Ollama daemon answers at {self.host or '127.0.0.1:11434'} (OLLAMA_HOST)") from None
        except ollama.ResponseError as exc:
            raise SourceError(f"{self.describe()}: HTTP {exc.status_code}: {exc.error}") from exc
        for model in models:
            if model.model == self.name and model.digest:
                return f"sha256:{model.digest}"
        return None
