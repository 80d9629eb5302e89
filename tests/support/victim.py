"""A directory outside the zoo that hostile input must leave alone (issue #17).

Hostile-input tests build one beside the zoo, point the attack at it, and assert that
its snapshot (names, link targets, modes, bytes) is the same afterwards.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

Snapshot = dict[str, tuple[str, int, bytes | str]]


def make_victim(path: Path) -> Path:
    """A small tree of the user's own: a file, a read-only file, a subdirectory, a link."""
    (path / "sub").mkdir(parents=True, exist_ok=True)
    (path / "precious.txt").write_text("the user's own data\n")
    (path / "sub" / "notes.txt").write_text("more of it\n")
    (path / "readonly.txt").write_text("keep me\n")
    os.chmod(path / "readonly.txt", 0o444)
    os.chmod(path, 0o755)
    if not (path / "link").is_symlink():
        os.symlink("precious.txt", path / "link")
    return path


def snapshot(path: Path) -> Snapshot:
    """Everything under *path*, without following links: kind, mode, content or target."""
    found: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for name in [".", *dirnames, *filenames]:
            full = Path(dirpath) if name == "." else Path(dirpath) / name
            st = full.lstat()
            rel = str(full.relative_to(path))
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", stat.S_IMODE(st.st_mode), os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", stat.S_IMODE(st.st_mode), b"")
            else:
                found[rel] = ("file", stat.S_IMODE(st.st_mode), full.read_bytes())
    return found
