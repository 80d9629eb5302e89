"""Plain HTTP(S): each file at ``base_url/path``; dropped connections resume with Range."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

from zoo_agent.errors import SourceError
from zoo_agent.sources.base import CHUNK, Source, Transient, with_retries

__all__ = ["UrlFiles"]

TIMEOUT_S = 30.0


class UrlFiles(Source):
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    def describe(self) -> str:
        parts = urllib.parse.urlsplit(self.base_url)
        netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=""))  # never credentials

    def read(self, path: str, offset: int = 0) -> Iterator[bytes]:
        url = f"{self.base_url}/{urllib.parse.quote(path)}"
        shown = f"{self.describe()}/{path}"

        def once(start: int) -> Iterator[bytes]:
            try:
                yield from self._stream(url, start)
            except urllib.error.HTTPError as exc:
                exc.close()  # it holds the response's socket
                if exc.code < 500 and exc.code != 429:
                    raise SourceError(f"{shown}: HTTP {exc.code} {exc.reason}") from None
                raise Transient(f"HTTP {exc.code} {exc.reason}") from exc
            except (urllib.error.URLError, OSError) as exc:
                raise Transient(str(getattr(exc, "reason", None) or exc)) from exc

        return with_retries(once, shown, offset)

    @staticmethod
    def _stream(url: str, offset: int) -> Iterator[bytes]:
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            if offset and response.status != 206:
                raise SourceError(f"{url}: the server ignored the Range request; cannot resume at byte {offset}")
            expected = response.headers.get("Content-Length")
            received = 0
            while chunk := response.read(CHUNK):
                received += len(chunk)
                yield chunk
            if expected is not None and received < int(expected):
                # http.client returns a short read as a clean end; it is a dropped connection.
                raise ConnectionError(f"connection closed after {received} of {expected} bytes")
