"""The resident's public socket and the bearer token that guards it (issues #5, #17)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from zoo_agent.errors import UsageError

__all__ = ["listen_socket", "read_api_key"]


def read_api_key(path: Path, option: str = "--api-key-file") -> str:
    """The bearer token: one line of visible ASCII. An empty file silently turned auth off (issue #17)."""
    try:
        key = path.read_bytes().decode("ascii").strip()
    except UnicodeDecodeError:
        raise UsageError(f"{option} {path}: not ASCII; a bearer token is visible ASCII characters") from None
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot be read: {exc.strerror or exc}") from exc
    if not key:
        raise UsageError(f"{option} {path}: empty; it must hold the bearer token (an empty one would turn auth off)")
    if not all(33 <= ord(c) < 127 for c in key):
        raise UsageError(f"{option} {path}: the token holds spaces or control characters; a bearer token is one word")
    return key


def listen_socket(spec: str, api_key: str | None) -> socket.socket:
    """A bound, listening socket: systemd's (LISTEN_FDS), a unix path, or host:port."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and int(os.environ.get("LISTEN_FDS", "0")) >= 1:
        return socket.socket(fileno=3)
    if spec.startswith("unix:") or spec.startswith("/"):
        path = spec.removeprefix("unix:")
        Path(path).unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
    else:
        host, _, port = spec.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        loopback = host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")
        if not loopback and not api_key:
            raise UsageError(f"--listen {spec}: listening beyond loopback needs a bearer token (--api-key-file)")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
        # and without it Nagle held each response body for the client's delayed ACK (+40 ms a request).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(port)))
        except OSError as exc:
            sock.close()
            raise UsageError(f"--listen {spec}: cannot bind: {exc.strerror}") from exc
    sock.listen(128)
    return sock
