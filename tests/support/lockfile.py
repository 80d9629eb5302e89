"""What the locks in requirements/ were compiled from, and what they pin (issue #16).

Run as a script (``.ci/lock`` does), it prints the digest of pyproject.toml's dependency
lists; the lock stores it, so a test tells a lock compiled from other inputs.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent

#: lock file -> the extras it was compiled with
LOCKS: dict[str, tuple[str, ...]] = {
    "requirements/resident.txt": ("resident",),
    "requirements/test.txt": ("resident", "test"),
}


def pyproject() -> dict:  # type: ignore[type-arg]
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requested(extras: tuple[str, ...]) -> list[str]:
    """The requirement strings a lock with these extras must satisfy, build backend included."""
    project = pyproject()
    lines = list(project["project"]["dependencies"]) + list(project["build-system"]["requires"])
    for extra in extras:
        lines += project["project"]["optional-dependencies"][extra]
    return lines


def inputs_digest() -> str:
    """One digest over every dependency list and constraint a lock depends on."""
    project = pyproject()
    inputs = {
        "dependencies": project["project"]["dependencies"],
        "optional": project["project"]["optional-dependencies"],
        "build": project["build-system"]["requires"],
        "constraints": (REPO / "requirements" / "constraints.txt").read_text(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def pins(lock: str) -> dict[str, str]:
    """name (normalized) -> pinned version."""
    found: dict[str, str] = {}
    for line in (REPO / lock).read_text().splitlines():
        if m := _PIN.match(line):
            found[normalize(m.group(1))] = m.group(2)
    return found


def stored_digest(lock: str) -> str | None:
    m = re.search(r"^# inputs-sha256: ([0-9a-f]{64})$", (REPO / lock).read_text(), re.M)
    return m.group(1) if m else None


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


if __name__ == "__main__":
    print(inputs_digest())
