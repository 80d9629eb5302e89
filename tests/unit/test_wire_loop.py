"""The router's loop quiets exactly one callback error: anyio's wake-up of a read that was cancelled.

Reproduced with a real anyio unix-socket stream (what httpx uses over a worker's socket): a read
waits, data arrives and the read is cancelled in the same loop turn, before the reader callback
runs. Without the handler asyncio logs "Exception in callback ... InvalidStateError"; with it,
nothing; any other callback error is still logged.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest

anyio = pytest.importorskip("anyio", reason="the resident extra is not installed (pip install -e .[resident])")

from zoo_agent.resident.wire.loop import quiet_cancelled_wakeups  # noqa: E402


def _race(path: Path, quiet: bool) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if quiet:
            quiet_cancelled_wakeups(loop)
        stream = await anyio.connect_unix(str(path))
        peer, _ = server.accept()
        try:
            reading = asyncio.ensure_future(stream.receive())
            await asyncio.sleep(0.05)  # the read waits on its future
            peer.send(b"x")  # readable at the next select
            loop.call_soon(reading.cancel)  # queued before the reader callback of that same turn
            await asyncio.sleep(0.05)
            assert reading.cancelled()
        finally:
            peer.close()
            await stream.aclose()

    try:
        asyncio.run(main())
    finally:
        server.close()


def test_without_the_handler_asyncio_logs_the_race(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _race(tmp_path / "s.sock", quiet=False)
    assert any("InvalidStateError" in (r.exc_text or "") or "invalid state" in r.getMessage() or r.exc_info for r in caplog.records), \
        "the race did not happen: this test no longer shows what the handler is for"


def test_with_the_handler_the_cancelled_wakeup_is_quiet(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _race(tmp_path / "s.sock", quiet=True)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_other_callback_errors_are_still_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        quiet_cancelled_wakeups(loop)
        done = loop.create_future()
        done.set_result(1)
        loop.call_soon(done.set_result, 2)  # not cancelled: a real error
        loop.call_soon(lambda: 1 / 0)
        await asyncio.sleep(0.01)

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(main())
    messages = [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert any("division by zero" in m for m in messages) and any("invalid state" in m for m in messages)
