"""What memory is doing now, from /proc and cgroupfs (Linux): for a reload that wants two versions
at once, and for the pager, which counts what each worker really holds (issue #34).

A worker's RAM is its cgroup's working set where it has a cgroup of its own (``memory.current``
less ``inactive_file``, the page cache the kernel takes back first: kubelet's measure), else its
RSS. Device memory comes from a ``DeviceReader``: our worker reports its allocator's reservation
(``device_reserved``, in its pong); an engine's process may be read otherwise (NVML). A reading
that cannot be made is None: unknown, never zero.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["DeviceReader", "RamReader", "cgroup_working_set", "device_reserved", "mem_available", "process_ram", "reported", "rss"]

#: (pid, the worker's cgroup or None) -> bytes of RAM it holds, or None.
RamReader = Callable[[int, Path | None], int | None]
#: (pid, what the worker itself reported or None) -> bytes of device memory it holds, or None.
DeviceReader = Callable[[int, int | None], int | None]


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
    except (OSError, ValueError, IndexError):
        return 0


def cgroup_working_set(cgroup: Path) -> int | None:
    """``memory.current`` less ``inactive_file`` of a cgroup (v2), or None when it cannot be read."""
    try:
        current = int((cgroup / "memory.current").read_text(encoding="ascii").strip())
        with open(cgroup / "memory.stat", encoding="ascii") as f:
            stat = f.read(1 << 16)  # a few dozen lines
        inactive = next((int(line.split()[1]) for line in stat.splitlines() if line.startswith("inactive_file ")), 0)
        return max(0, current - inactive)
    except (OSError, ValueError):
        return None


def process_ram(pid: int, cgroup: Path | None) -> int | None:
    """The RAM a worker holds: its own cgroup's working set, else its RSS (None: gone or unreadable)."""
    if cgroup is not None and (used := cgroup_working_set(cgroup)) is not None:
        return used
    return rss(pid) or None


def reported(pid: int, own: int | None) -> int | None:
    """Device memory as the worker reported it (our worker: its allocator's reservation); None when it did not."""
    return own


def device_reserved(device: Any) -> int | None:
    """In the worker: the device memory torch's allocator holds on ``device`` (weights, KV cache, activations),
    or None off CUDA. Per process, unlike ``mem_get_info`` (the whole device's). ``device``: a
    ``torch.device`` or its name ("cuda", "cuda:1"), as backends hold it."""
    kind = device.split(":", 1)[0] if isinstance(device, str) else getattr(device, "type", None)
    if kind != "cuda":
        return None
    import torch

    return int(torch.cuda.memory_reserved(device))
