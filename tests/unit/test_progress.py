"""Progress under systemd or --json: plain lines, at most one every few seconds (issue #3)."""

from __future__ import annotations

import logging

import pytest

from zoo_agent.reconcile import progress


def test_plain_progress_is_throttled(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    clock = iter([0.0, 1.0, 2.0, 6.0, 7.0, 12.5])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="zoo_agent")
    advance = progress.Progress(1000).item("m/w", 1000)  # reads the clock once
    for _ in range(5):
        advance(100)
    assert [r.getMessage() for r in caplog.records] == ["m/w: 30% (300 B of 1.0 kB)", "m/w: 50% (500 B of 1.0 kB)"]


def test_no_bars_under_journal_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    assert type(progress.make_progress(10, machine_output=False)) is progress.Progress
    monkeypatch.delenv("JOURNAL_STREAM")
    assert type(progress.make_progress(10, machine_output=True)) is progress.Progress
