"""Pure: what an index change pins, entry by entry and file by file (issue #35).

Both documents are the raw JSON of an index. The head is validated before it gets here;
the base may be older or even invalid, so every shape is read defensively and anything
that is not an entry or a file is left out rather than trusted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["KINDS", "EntryChange", "FilePin", "changes", "totals"]

#: The sections whose entries pin files.
KINDS = ("models", "loras")

Status = Literal["added", "changed", "same"]


@dataclass(frozen=True)
class FilePin:
    """One file the head pins; ``status`` compares its bytes (sha256, size) with the base's."""

    path: str
    sha256: str
    size: int
    status: Status


@dataclass(frozen=True)
class EntryChange:
    """An entry the head declares differently from the base (or newly)."""

    kind: str
    id: str
    before: Mapping[str, Any] | None  # the base's entry; None when the entry is new
    after: Mapping[str, Any]
    files: tuple[FilePin, ...]  # every file the head pins, sorted by path
    removed: tuple[str, ...]  # paths the base pinned and the head does not

    @property
    def source(self) -> Mapping[str, Any]:
        source = self.after.get("source")
        return source if isinstance(source, Mapping) else {}

    @property
    def moved(self) -> bool:
        """Whether the entry now names another place (a new commit, another directory)."""
        before = self.before.get("source") if self.before is not None else None
        return before != self.after.get("source")

    def new_pins(self) -> tuple[FilePin, ...]:
        """The claims the base did not make: changed bytes, or any file once the source moved."""
        return tuple(f for f in self.files if f.status != "same" or self.moved)


def _entries(document: Any, kind: str) -> dict[str, Mapping[str, Any]]:
    section = document.get(kind) if isinstance(document, Mapping) else None
    if not isinstance(section, Mapping):
        return {}
    return {k: v for k, v in section.items() if isinstance(k, str) and isinstance(v, Mapping)}


def _files(entry: Mapping[str, Any] | None) -> dict[str, tuple[str, int]]:
    files = entry.get("files") if entry is not None else None
    found: dict[str, tuple[str, int]] = {}
    for f in files if isinstance(files, list) else []:
        if not isinstance(f, Mapping):
            continue
        path, sha256, size = f.get("path"), f.get("sha256"), f.get("size")
        if isinstance(path, str) and isinstance(sha256, str) and isinstance(size, int) and not isinstance(size, bool):
            found[path] = (sha256, size)
    return found


def _status(old: tuple[str, int] | None, new: tuple[str, int]) -> Status:
    return "added" if old is None else "same" if old == new else "changed"


def totals(entry: Mapping[str, Any] | None) -> tuple[int, int]:
    """(files, bytes) an entry pins."""
    files = _files(entry)
    return len(files), sum(size for _, size in files.values())


def changes(base: Any, head: Any) -> list[EntryChange]:
    """Every entry of ``head`` that differs from ``base``, in index order (kind, then id)."""
    found = []
    for kind in KINDS:
        old_entries = _entries(base, kind)
        for aid, after in sorted(_entries(head, kind).items()):
            before = old_entries.get(aid)
            if before == after:
                continue
            old, new = _files(before), _files(after)
            pins = tuple(FilePin(path, *pin, _status(old.get(path), pin)) for path, pin in sorted(new.items()))
            found.append(EntryChange(kind, aid, before, after, pins, tuple(sorted(set(old) - set(new)))))
    return found
