"""sd_notify sender: one datagram per message, abstract sockets, never blocks (issue #5)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from zoo_agent.systemd.notify import Notifier


def test_messages_are_single_datagrams(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(tmp_path / "n"))
        n = Notifier(str(tmp_path / "n"))
        assert n.ready("t: m@v1")
        assert n.reloading("reloading m@v2")
        assert server.recv(4096) == b"READY=1\nSTATUS=t: m@v1"
        fields = server.recv(4096).decode().split("\n")
        assert fields[0] == "RELOADING=1" and fields[1].startswith("MONOTONIC_USEC=") and fields[2] == "STATUS=reloading m@v2"


def test_abstract_socket(tmp_path: Path) -> None:
    name = f"zoo-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        assert Notifier("@" + name).watchdog()
        assert server.recv(4096) == b"WATCHDOG=1"


def test_no_socket_is_a_no_op_and_errors_are_counted(tmp_path: Path, monkeypatch: object) -> None:
    assert Notifier("").ready() is False
    n = Notifier(str(tmp_path / "nobody-listens"))
    assert n.status("x") is False and n.failures == 1


def test_a_receiver_that_stops_reading_never_blocks_the_sender(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(tmp_path / "n"))
        n = Notifier(str(tmp_path / "n"))
        started = time.monotonic()
        results = [n.status(f"line {i}") for i in range(200)]  # nobody reads: the queue fills
        assert time.monotonic() - started < 30  # a bound, not a benchmark: blocking would hang here
        assert results[0] is True and results[-1] is False and n.failures > 0
        assert len(Notifier.status_field("x" * 5000)) == len("STATUS=") + 1024  # a huge STATUS would vanish (EMSGSIZE)
