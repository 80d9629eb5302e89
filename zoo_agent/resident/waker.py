"""The supervisor's self-pipe: another thread (the router's, a fetch's, a verification's) wakes
its loop now instead of at its next tick."""

from __future__ import annotations

import selectors
import socket

__all__ = ["WAKE", "Waker"]

WAKE = "wake"  # the selector key's data for the self-pipe


class Waker:
    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.w.setblocking(False)
        selector.register(self.r, selectors.EVENT_READ, WAKE)

    def wake(self) -> None:
        """From any thread."""
        try:
            self.w.send(b"!")
        except OSError:
            pass  # the buffer is full: a wake-up is pending anyway

    def drain(self) -> None:
        """On the loop, once woken."""
        try:
            while self.r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError, OSError):
            pass

    def close(self) -> None:
        self.r.close()
        self.w.close()
