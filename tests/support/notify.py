"""A datagram socket standing in for systemd's NOTIFY_SOCKET (standard library only: the
fleet harness and the benchmarks use it too)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["Notify"]


class Notify:
    """A datagram socket standing in for systemd's: records every sd_notify message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, dict[str, str]]] = []
        threading.Thread(target=self._listen, daemon=True).start()

    def _listen(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536).decode()
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.split("\n") if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def wait(self, pred: Callable[[dict[str, str]], bool], timeout: float = 60, after: int = 0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, fields in self.messages[after:]:
                if pred(fields):
                    return fields
            time.sleep(0.05)
        raise AssertionError(f"no such sd_notify message within {timeout}s; got {[m for _, m in self.messages]}")

    def keys(self) -> list[str]:
        return [k for _, m in self.messages for k in m]
