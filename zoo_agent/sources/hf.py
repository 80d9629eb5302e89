"""The Hugging Face hub (or a site mirror at HF_ENDPOINT), pinned to a commit (issue #4).

Built on the real ``huggingface_hub`` client: its URL building (``hf_hub_url``), headers
(``build_hf_headers``), HTTP session and error mapping (``hf_raise_for_status``). The
bytes stream to the store, which hashes them as it writes: the client itself checks
only sizes. A dropped connection resumes with a Range request. Hub exception types
stop here: everything above sees ``SourceError``.

The token is never logged, printed, put in a message or written anywhere; it lives
only in the headers of requests to the endpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import httpx2
from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_url
from huggingface_hub.utils import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    build_hf_headers,
    get_session,
    hf_raise_for_status,
)

from zoo_agent.errors import SourceError
from zoo_agent.sources.base import CHUNK, TOKEN_HELP, FetchSettings, Source, Transient, with_retries

__all__ = ["HfRepo"]


if "HF_HUB_DISABLE_TELEMETRY" not in os.environ:
    # Left on, building the user agent fetches {ENDPOINT}/api/agent-harnesses and caches
    # it under HF_HOME: a request and a write outside the zoo that a deployment agent
    # must not make. Read at call time, so this holds even if the hub was imported first.
    hub_constants.HF_HUB_DISABLE_TELEMETRY = True

TIMEOUT_S = 30.0


class HfRepo(Source):
    def __init__(self, repo: str, revision: str, settings: FetchSettings) -> None:
        self.repo, self.revision, self.settings = repo, revision, settings

    def describe(self) -> str:
        return f"hf:{self.repo}@{self.revision[:12]}"

    def headers(self) -> dict[str, str]:
        from zoo_agent._version import __version__

        return build_hf_headers(token=self.settings.hf_token or False, library_name="zoo-agent", library_version=__version__)

    def url(self, path: str) -> str:
        return hf_hub_url(self.repo, path, revision=self.revision, endpoint=self.settings.hf_endpoint)

    @contextmanager
    def translated(self, path: str = "") -> Iterator[None]:
        """Hub exception types stop here; ``Transient`` marks what is worth another attempt."""
        shown = f"{self.describe()}: {path}" if path else self.describe()
        try:
            yield
        except (RepositoryNotFoundError, GatedRepoError) as exc:
            raise SourceError(self._access_message(exc)) from exc
        except RevisionNotFoundError:
            raise SourceError(f"hf:{self.repo}: revision {self.revision} not found") from None
        except EntryNotFoundError:
            raise SourceError(f"{shown}: no such file at revision {self.revision}") from None
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status < 500 and status != 429:
                raise SourceError(f"{shown}: HTTP {status}") from None
            raise Transient(f"HTTP {status}") from exc
        except (httpx2.TransportError, ConnectionError) as exc:
            raise Transient(type(exc).__name__ + (f": {exc}" if str(exc) else "")) from exc

    def read(self, path: str, offset: int = 0) -> Iterator[bytes]:
        shown = f"{self.describe()}: {path}"
        if self.settings.offline:
            raise SourceError(f"{shown}: missing from the zoo, and offline mode (--offline / HF_HUB_OFFLINE) forbids fetching it")

        def once(start: int) -> Iterator[bytes]:
            with self.translated(path):
                yield from self._stream(path, start)

        return with_retries(once, shown, offset)

    def _access_message(self, exc: Exception) -> str:
        what = "gated" if isinstance(exc, GatedRepoError) else "private or missing"
        if self.settings.hf_token:
            return f"hf:{self.repo}: {what}, and the token given has no access to it"
        return f"hf:{self.repo}: {what}; if you have access, {TOKEN_HELP}"

    def _stream(self, path: str, offset: int) -> Iterator[bytes]:
        headers = self.headers()
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with get_session().stream("GET", self.url(path), headers=headers, follow_redirects=True, timeout=TIMEOUT_S) as response:
            hf_raise_for_status(response)
            if offset and response.status_code != 206:
                raise SourceError(f"{self.describe()}: {path}: the server ignored the Range request")
            expected = response.headers.get("Content-Length")
            received = 0
            for chunk in response.iter_bytes(CHUNK):
                received += len(chunk)
                yield chunk
            if expected is not None and received < int(expected):
                raise ConnectionError(f"connection closed after {received} of {expected} bytes")
