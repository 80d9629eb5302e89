"""What the host's memory is doing now, from /proc (Linux): for a reload that wants two versions at once."""

from __future__ import annotations

import os

__all__ = ["mem_available", "rss"]


def mem_available() -> int | None:
    """MemAvailable in bytes; None when it cannot be read (a unit with ProcSubset=pid hides
    /proc/meminfo): unknown is a refusal to load beside the old version, never infinity."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
