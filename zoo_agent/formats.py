"""How sizes and times are written and read, once for the whole package (issue #32).

``human_bytes`` for every message and table, ``parse_memory`` for every size in systemd's
notation (``memory_budget``, ``memory_max``), ``now`` for every timestamp we write.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

__all__ = ["MEMORY_PATTERN", "human_bytes", "now", "parse_memory", "parse_timespan"]

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


#: systemd's time-span units (systemd.time(7)), in seconds; a bare number is seconds.
_SPAN_UNITS = {
    "us": 1e-6, "usec": 1e-6, "μs": 1e-6, "ms": 1e-3, "msec": 1e-3,
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
    "M": 2629800, "month": 2629800, "months": 2629800,  # 30.44 days, as systemd counts a month
    "y": 31557600, "year": 31557600, "years": 31557600,  # 365.25 days
}  # fmt: skip
_SPAN_PART = re.compile(r"\s*([0-9]{1,9}(?:\.[0-9]{1,6})?)\s*([A-Za-zμ]*)")
#: At most this many parts ("1h 30min" has two): a span is a short phrase, not a document.
_SPAN_PARTS = 8


def parse_timespan(spec: str) -> float:
    """Seconds of a time span in systemd's notation ("1h", "30min", "1h 30min", "90", "2 days"),
    as ``OnUnitActiveSec=`` reads it; ``ValueError`` naming the part it cannot read."""
    if not isinstance(spec, str) or not spec.strip() or len(spec) > 100:
        raise ValueError(f"{spec!r:.60} is not a time span in systemd's notation (such as '1h', '30min', '1h 30min')")
    total, pos, parts = 0.0, 0, 0
    while pos < len(spec) and spec[pos:].strip():
        m = _SPAN_PART.match(spec, pos)
        parts += 1
        if m is None or parts > _SPAN_PARTS or (m.group(2) not in _SPAN_UNITS and m.group(2) != ""):
            shown = m.group(2)[:20] if m is not None and m.group(2) and parts <= _SPAN_PARTS else spec[pos:].strip()[:20]
            raise ValueError(f"{spec!r:.60} is not a time span in systemd's notation: cannot read {shown!r} (units: s, min, h, d, w, M, y, ...)")
        total += float(m.group(1)) * _SPAN_UNITS.get(m.group(2), 1)
        pos = m.end()
    return total
