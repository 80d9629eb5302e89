"""How sizes and times are written and read, once for the whole package (issue #32).

``human_bytes`` for every message and table, ``parse_memory`` for every size in systemd's
notation (``memory_budget``, ``memory_max``), ``parse_timespan`` for every time span in its
notation (``keep_alive``), ``now`` for every timestamp we write.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

__all__ = ["MEMORY_PATTERN", "TIMESPAN_PATTERN", "human_bytes", "now", "parse_memory", "parse_timespan"]

#: A size in systemd's notation. At most 16 digits (issue #31): thousands of them overflowed
#: float arithmetic and Python's int-from-string limit; 16 digits of T is beyond any machine.
MEMORY_PATTERN = r"^[1-9][0-9]{0,15}[KMGT]?$"

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}

#: Seconds of each unit of a systemd time span (systemd.time(7)); a number alone is seconds.
_SPAN_UNITS = {
    "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "": 1, "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400, "w": 604800, "week": 604800, "weeks": 604800,
}  # fmt: skip
_SPAN_UNIT = "(?:" + "|".join(sorted((u for u in _SPAN_UNITS if u), key=len, reverse=True)) + ")"
#: A time span in systemd's notation ('5min', '1h 30min', '90', '0'), or 'infinity'. At most 8
#: parts of at most 9 digits each: bounded, as every number of an index is (issue #31).
_SPAN_PART = rf"(?:[0-9]{{1,9}} ?{_SPAN_UNIT}|[0-9]{{1,9}}(?![0-9]))"  # a number alone ends where its digits end
TIMESPAN_PATTERN = rf"^(?:infinity|{_SPAN_PART}(?: ?{_SPAN_PART}){{0,7}})$"


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


def parse_timespan(spec: str) -> float | None:
    """Seconds of a systemd time span ("5min", "1h 30min", "90" = 90 s); None for "infinity" (never)."""
    if not isinstance(spec, str) or not re.fullmatch(TIMESPAN_PATTERN, spec):
        raise ValueError(f"{spec!r} is not a time span in systemd's notation (e.g. 30s, 5min, 1h 30min, or infinity)")
    if spec == "infinity":
        return None
    return float(sum(int(n) * _SPAN_UNITS[unit] for n, unit in re.findall(r"([0-9]+) ?([a-z]*)", spec)))


def now() -> str:
    """UTC, milliseconds, ``Z``: sortable as text, what every record and log line carries."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
