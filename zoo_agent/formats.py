"""How sizes and times are written and read, once for the whole package (issue #32).

``human_bytes`` for every message and table, ``parse_memory`` for every size in systemd's
notation (``memory_budget``, ``memory_max``), ``now`` for every timestamp we write.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

__all__ = ["MEMORY_PATTERN", "human_bytes", "now", "parse_memory"]

#: A size in systemd's notation. At most 16 digits (issue #31): thousands of them overflowed
#: float arithmetic and Python's int-from-string limit; 16 digits of T is beyond any machine.
MEMORY_PATTERN = r"^[1-9][0-9]{0,15}[KMGT]?$"

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def parse_memory(spec: str) -> int:
    """Bytes of a systemd size ("8G", "512M", "123"): K/M/G/T are powers of 1024, as systemd reads them."""
    if not isinstance(spec, str) or not re.fullmatch(MEMORY_PATTERN, spec):
        raise ValueError(f"{spec!r} is not a size in systemd's notation (digits, then optionally K, M, G or T)")
    return int(spec.rstrip("KMGT")) * _UNITS[spec[-1] if spec[-1] in "KMGT" else ""]


def now() -> str:
    """UTC, milliseconds, ``Z``: sortable as text, what every record and log line carries."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
