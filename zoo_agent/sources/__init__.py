"""Where artifact bytes come from: one small protocol, one module per source type.

A source only streams bytes; the store hashes them as it writes and decides whether they
are right. Foreign errors (OSError, HTTP) become ``SourceError`` here, so nothing above
this package sees them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from .. import index
from ..errors import SourceError

__all__ = ["CHUNK", "Source", "open_source"]

CHUNK = 1 << 20  # 1 MiB: large enough that hashlib releases the GIL, small enough for flat RSS


class Source(Protocol):
    def describe(self) -> str:
        """Where the bytes come from, for messages (never a secret)."""
        ...

    def read(self, path: str, offset: int = 0) -> Iterator[bytes]:
        """Stream one file from ``offset`` on; raise ``SourceError`` if it cannot."""
        ...


def open_source(spec: index.Source, index_dir: Path) -> Source:
    if isinstance(spec, index.FileSource):
        from .file import FileDir

        return FileDir(index_dir / spec.path)
    if isinstance(spec, index.UrlSource):
        from .url import UrlFiles

        return UrlFiles(spec.base_url)
    raise SourceError(f"{spec.type} sources are not supported by this version of zoo-agent yet")
