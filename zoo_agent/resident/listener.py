"""The resident's public socket and the bearer token that guards it (issues #5, #17, #31)."""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from pathlib import Path

from zoo_agent.errors import UsageError
from zoo_agent.keyfile import read_key_file

__all__ = ["is_loopback", "listen_socket", "read_api_key", "read_keys"]


def read_api_key(path: Path, option: str = "--api-key-file") -> str:
    """The bearer token: one line of visible ASCII from a regular file (``keyfile.read_key_file``)."""
    return read_key_file(path, option)


def read_keys(api: Path | None, fleet: Path | None, priority: Path | None) -> tuple[str | None, str | None, str | None]:
    """The API, fleet and priority keys; the privileged one must be a key of its own (else every
    client, or every peer, would be privileged)."""
    api_key = read_api_key(api) if api else None
    fleet_key = read_api_key(fleet, "--fleet-key-file") if fleet else None
    priority_key = read_api_key(priority, "--priority-key-file") if priority else None
    if priority_key is not None and priority_key in (api_key, fleet_key):
        raise UsageError(f"--priority-key-file {priority}: the same key as --{'api' if priority_key == api_key else 'fleet'}-key-file; "
                         "the privileged key must be a key of its own")  # fmt: skip
    return api_key, fleet_key, priority_key


def is_loopback(address: object) -> bool:
    """Whether a socket address (``getsockname()``) reaches only this machine: an IP in
    127.0.0.0/8 or ::1 (IPv4-mapped loopback too), or a unix socket. Decided from the
    address, never from how ``--listen`` spelled it: a name that starts with ``127.`` may
    resolve anywhere (issue #31)."""
    if isinstance(address, (str, bytes)):
        return True  # AF_UNIX: a path (or an abstract name), reached through the filesystem
    if not isinstance(address, tuple) or not address or not isinstance(address[0], str):
        return False
    try:
        ip = ipaddress.ip_address(address[0].partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _needs_key(address: object, what: str, api_key: str | None, sock: socket.socket | None = None) -> None:
    """Refuse an ``address`` beyond loopback when there is no bearer token (closing ``sock``, if given)."""
    if api_key or is_loopback(address):
        return
    if sock is not None:
        sock.close()
    where = address[0] if isinstance(address, tuple) and address else "an address that is not loopback"
    raise UsageError(f"{what}: listening beyond loopback needs a bearer token (--api-key-file); it binds {where}")


def _bound(sock: socket.socket) -> object:
    try:
        return sock.getsockname()
    except OSError:
        return None


def _remove_stale_socket(path: Path) -> None:
    """A socket left by an earlier run is removed; anything else at the path (a user's file) is
    left alone, and the bind below then fails with one line."""
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    except OSError:
        pass


def _shown(spec: str) -> str:
    """The flag's value as typed, or escaped when it holds a control character (one line stays one line)."""
    return spec if spec.isprintable() else ascii(spec)


def _tcp_address(spec: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``; an empty host is 127.0.0.1) or one line naming --listen."""
    host, _, port = spec.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen {_shown(spec)}: expected host:port (a port from 0 to 65535) or unix:/path")
    return host, int(port)


def _unix_path(spec: str) -> str:
    """``unix:PATH``'s path, or one line naming --listen: an empty path binds an abstract socket (Linux
    autobinds a random name any local user may reach, with no file mode to guard it), and so does a NUL byte."""
    path = spec.removeprefix("unix:")
    why = "an empty one would bind an abstract socket, which no file guards" if not path else (
        "a NUL byte names an abstract socket, or nothing" if "\x00" in path else None)  # fmt: skip
    if why is not None:
        raise UsageError(f"--listen {_shown(spec)}: expected unix:/path, a socket file's path ({why})")
    return path


def listen_socket(spec: str, api_key: str | None) -> socket.socket:
    """A bound, listening socket: systemd's (LISTEN_FDS), a unix path, or host:port.

    Whether a bearer token is required is decided from the address the socket is bound
    to, after name resolution, before it listens: no connection is ever accepted on an
    address beyond loopback without one."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and int(os.environ.get("LISTEN_FDS", "0")) >= 1:
        sock = socket.socket(fileno=3)
        _needs_key(_bound(sock), "the socket systemd passed (LISTEN_FDS)", api_key, sock)
        return sock
    if spec.startswith(("unix:", "/")):
        path = _unix_path(spec)
        _remove_stale_socket(Path(path))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise UsageError(f"--listen {_shown(spec)}: cannot bind: {exc.strerror or exc}") from exc
    else:
        host, port = _tcp_address(spec)
        try:  # an IPv4 address for a name, as before; an IPv6 one for a literal such as [::1]
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            family, _, _, _, address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, socket.IPPROTO_TCP)[0]
        except (OSError, UnicodeError) as exc:
            why = getattr(exc, "strerror", None) or exc
            raise UsageError(f"--listen {_shown(spec)}: cannot resolve {host!r}: {why}") from None
        _needs_key(address, f"--listen {_shown(spec)}", api_key)  # the resolved address, before anything is bound
        # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
        # and without it Nagle held each response body for the client's delayed ACK (+40 ms a request).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise UsageError(f"--listen {_shown(spec)}: cannot bind: {exc.strerror}") from exc
        _needs_key(_bound(sock), f"--listen {_shown(spec)}", api_key, sock)  # and what was bound, before it listens
    sock.listen(128)
    return sock
