"""How a worker's memory is read (issue #34): a cgroup's working set, else RSS; unknown is None."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from zoo_agent.resident.memory import cgroup_working_set, process_ram, reported, rss


def test_a_cgroup_counts_its_working_set_not_the_page_cache_the_kernel_takes_back_first(tmp_path: Path) -> None:
    (tmp_path / "memory.current").write_text("1000000\n")
    (tmp_path / "memory.stat").write_text("anon 600000\nfile 400000\ninactive_file 300000\nactive_file 100000\n")
    assert cgroup_working_set(tmp_path) == 700000
    assert process_ram(os.getpid(), tmp_path) == 700000


def test_no_cgroup_or_an_unreadable_one_is_the_process_rss(tmp_path: Path) -> None:
    assert cgroup_working_set(tmp_path) is None  # no such files
    (tmp_path / "memory.current").write_text("garbage")
    assert cgroup_working_set(tmp_path) is None
    own = process_ram(os.getpid(), tmp_path)
    assert own is not None and own > 1 << 20 and abs(own - rss(os.getpid())) < 64 << 20
    assert process_ram(os.getpid(), None) is not None


def test_a_process_that_is_gone_reads_as_unknown_not_zero() -> None:
    assert process_ram(2**22 + 12345, None) is None  # above pid_max's default: no such process
    assert reported(1, None) is None and reported(1, 5) == 5


def test_device_memory_is_read_for_a_device_named_by_a_string_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The transformers backend holds its device as a string ("cuda"): its GPU memory must still be reported."""
    torch = pytest.importorskip("torch", reason="torch is not installed (the resident extra)")
    from zoo_agent.resident.memory import device_reserved

    asked: list[object] = []
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: asked.append(device) or 123)
    assert device_reserved("cuda") == 123 and device_reserved("cuda:1") == 123 and device_reserved(torch.device("cuda", 0)) == 123
    assert device_reserved("cpu") is None and device_reserved(torch.device("cpu")) is None and len(asked) == 3
