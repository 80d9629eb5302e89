"""The url source against a real HTTP server on 127.0.0.1, lock and concurrency (issue #3)."""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time

from tests.support.httpfiles import serve
from tests.support.world import World


def _declare_url(world: World, version: str, files: dict[str, bytes], url: str) -> None:
    world.artifact("m", version, files, source={"type": "url", "base_url": url})


def test_url_source_fetches_and_verifies(world: World) -> None:
    files = {"config.json": b"{}", "sub/model.safetensors": os.urandom(300_000)}
    with serve(files) as server:
        _declare_url(world, "v1", files, server.url)
        result = world.run("apply")
    assert result.exit_code == 0, result.output
    assert (world.root / "models/m/current/sub/model.safetensors").read_bytes() == files["sub/model.safetensors"]


def test_url_source_resumes_a_dropped_connection_with_range(world: World) -> None:
    data = os.urandom(3 << 20)
    with serve({"w": data}) as server:
        server.faults.drop_after["w"] = 1 << 20
        _declare_url(world, "v1", {"w": data}, server.url)
        result = world.run("apply")
        requests = list(server.faults.requests)
    assert result.exit_code == 0, result.output
    assert requests[0] == ("w", "") and requests[1][1].startswith("bytes=")
    assert int(requests[1][1].removeprefix("bytes=").rstrip("-")) >= 1 << 20  # resumed, not restarted


def test_url_404_is_one_line_and_publishes_nothing(world: World) -> None:
    with serve({}) as server:
        _declare_url(world, "v1", {"w": b"data"}, server.url)
        result = world.run("apply")
    assert result.exit_code == 1
    assert f"{server.url}/w: HTTP 404 Not Found" in result.stderr
    assert not (world.root / "models/m/current").exists()
    assert [p for p in world.root.rglob("*") if ".tmp" in p.name] == []


def test_url_server_errors_are_retried_then_reported(world: World) -> None:
    with serve({"w": b"data"}) as server:
        server.faults.status["w"] = 503
        _declare_url(world, "v1", {"w": b"data"}, server.url)
        result = world.run("apply")
        attempts = len(server.faults.requests)
    assert result.exit_code == 1
    assert "HTTP 503 Service Unavailable (gave up after 4 attempts)" in result.stderr
    assert attempts == 4


def test_lock_held_exits_75_and_wait_waits(world: World) -> None:
    world.artifact("m", "v1", {"a": b"1"})
    world.root.mkdir()
    fd = os.open(world.root / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        result = world.run("apply")
        assert (result.exit_code, result.stderr.strip()) == (75, f"{world.root}: another zoo-agent run holds the lock; retry, or pass --wait SECONDS")
        assert not (world.root / "models").exists()
        threading.Timer(0.5, lambda: os.close(fd)).start()
        result = world.run("apply", "--wait", "10")
        assert result.exit_code == 0, result.output
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def test_two_concurrent_applies_second_exits_75_nothing_corrupts(world: World) -> None:
    data = os.urandom(4 << 20)
    with serve({"w": data}) as server:
        server.faults.pause_at["w"] = 1 << 20  # the first run holds the lock mid-fetch
        _declare_url(world, "v1", {"w": data}, server.url)
        first = world.spawn("apply")
        assert server.faults.paused.wait(timeout=30)
        second = world.spawn("apply")
        out, err = second.communicate(timeout=60)
        waiting = world.spawn("apply", "--wait", "60")
        time.sleep(0.5)
        server.faults.resume.set()
        assert first.wait(timeout=60) == 0, first.stderr.read() if first.stderr else ""
        assert waiting.wait(timeout=60) == 0
    assert second.returncode == 75, err
    assert "another zoo-agent run holds the lock" in err
    assert (world.root / "models/m/current/w").read_bytes() == data
    for proc in (first, waiting):
        proc.communicate()


def test_sigterm_mid_fetch_leaves_current_intact(world: World) -> None:
    world.artifact("m", "v1", {"w": b"old"})
    assert world.run("apply").exit_code == 0
    data = os.urandom(2 << 20)
    with serve({"w": data}) as server:
        server.faults.pause_at["w"] = 1 << 19
        _declare_url(world, "v2", {"w": data}, server.url)
        proc = world.spawn("apply")
        assert server.faults.paused.wait(timeout=30)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert (world.root / "models/m/current/w").read_bytes() == b"old"
    assert [p for p in world.root.rglob("*") if ".tmp" in p.name] != []  # the killed run's staging
    rerun = world.run("apply")  # the server is gone: the rerun fails cleanly...
    assert rerun.exit_code == 1 and "gave up after 4 attempts" in rerun.stderr
    assert [p for p in world.root.rglob("*") if ".tmp" in p.name] == []  # ...and leaves no staging
    assert (world.root / "models/m/current/w").read_bytes() == b"old"
