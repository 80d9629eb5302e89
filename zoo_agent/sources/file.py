"""A local directory: air-gapped hosts, shared storage, training pipelines, tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..errors import SourceError
from . import CHUNK

__all__ = ["FileDir"]


class FileDir:
    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self) -> str:
        return str(self.root)

    def read(self, path: str, offset: int = 0) -> Iterator[bytes]:
        target = self.root / path
        try:
            with open(target, "rb") as f:
                f.seek(offset)
                while chunk := f.read(CHUNK):
                    yield chunk
        except FileNotFoundError:
            where = "directory" if not self.root.is_dir() else "file"
            raise SourceError(f"file source {self.root}: {path}: no such {where}") from None
        except OSError as exc:
            raise SourceError(f"file source {self.root}: {path}: {exc.strerror or exc}") from exc
