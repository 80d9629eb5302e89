"""sd_notify, after systemd's self-contained example: one datagram per message.

No-op without $NOTIFY_SOCKET; '@' means an abstract socket. Unlike the ``sdnotify``
package it counts and logs failed sends instead of swallowing them, and reconnects for
every message, so a re-bound socket never breaks it silently.
"""

from __future__ import annotations

import logging
import os
import socket
import time

__all__ = ["Notifier", "watchdog_usec"]

log = logging.getLogger("zoo_agent.notify")

MAX_STATUS = 1024  # a large STATUS= vanishes (EMSGSIZE); keep it to a line


def watchdog_usec() -> int:
    """The watchdog interval systemd asks of this process (0: none), as sd_watchdog_enabled() reads it."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return 0
    return int(os.environ.get("WATCHDOG_USEC", "0") or 0)


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self.failures = 0

    def send(self, *fields: str) -> bool:
        if not self.address:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(target)
                # Never block: a unix datagram queue holds ~10 unread messages (max_dgram_qlen),
                # and a blocked supervisor would stop feeding the watchdog and handling signals.
                sock.send("\n".join(fields).encode(), socket.MSG_DONTWAIT)
            return True
        except OSError as exc:
            self.failures += 1
            log.warning("sd_notify to %s failed (%d so far): %s", self.address, self.failures, exc.strerror or exc)  # incl. EAGAIN
            return False

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([self.status_field(status)] if status else []))

    def status(self, text: str) -> bool:
        return self.send(self.status_field(text))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def watchdog_trigger(self) -> bool:
        return self.send("WATCHDOG=trigger")

    def extend_timeout(self, seconds: float, status: str) -> bool:
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}", self.status_field(status))

    def reloading(self, status: str) -> bool:
        # systemd 253+ wants MONOTONIC_USEC in the same datagram as RELOADING=1.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", self.status_field(status))

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", self.status_field(status))

    def failed(self, errno: int, status: str) -> bool:
        return self.send(f"ERRNO={errno}", self.status_field(status))

    @staticmethod
    def status_field(text: str) -> str:
        line = " ".join(text.split())
        return "STATUS=" + (line if len(line) <= MAX_STATUS else line[: MAX_STATUS - 1] + "…")
