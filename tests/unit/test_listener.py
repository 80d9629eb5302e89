"""`--listen` decides "loopback" from the address it binds, never from the spelling (issue #31)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from zoo_agent.errors import UsageError
from zoo_agent.resident.listener import is_loopback, listen_socket


def _resolving_to(monkeypatch: pytest.MonkeyPatch, name: str, address: str) -> None:
    """``name`` resolves to ``address`` (as a hostile DNS answer or /etc/hosts line would)."""
    real = socket.getaddrinfo

    def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        return real(address if host == name else host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)


@pytest.mark.parametrize("name", ["127.0.0.1.attacker.example", "localhost.attacker.example", "127.evil"])
def test_a_name_spelled_like_loopback_that_resolves_elsewhere_needs_a_key(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    _resolving_to(monkeypatch, name, "0.0.0.0")
    with pytest.raises(UsageError) as caught:
        listen_socket(f"{name}:0", None)
    assert str(caught.value) == f"--listen {name}:0: listening beyond loopback needs a bearer token (--api-key-file); it binds 0.0.0.0"
    listen_socket(f"{name}:0", "a-key").close()  # with a key it serves


def test_a_name_that_resolves_to_loopback_needs_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    _resolving_to(monkeypatch, "api.internal", "127.0.0.2")
    sock = listen_socket("api.internal:0", None)
    assert sock.getsockname()[0] == "127.0.0.2"
    sock.close()


@pytest.mark.parametrize("spec", ["0.0.0.0:0", "0:0", ":0", "127.0.0.1:0", "localhost:0", "127.1:0"])
def test_loopback_is_what_is_bound(spec: str) -> None:
    try:
        sock = listen_socket(spec, None)
    except UsageError as exc:
        assert spec in ("0.0.0.0:0", "0:0") and "needs a bearer token" in str(exc)
    else:
        assert is_loopback(sock.getsockname()) and spec not in ("0.0.0.0:0", "0:0")
        sock.close()


@pytest.mark.parametrize(("spec", "message"), [
    ("8000x", "--listen 8000x: expected host:port (a port from 0 to 65535) or unix:/path"),
    ("localhost", "--listen localhost: expected host:port (a port from 0 to 65535) or unix:/path"),
    ("127.0.0.1:70000", "--listen 127.0.0.1:70000: expected host:port (a port from 0 to 65535) or unix:/path"),
    ("127.0.0.1:٣", "--listen 127.0.0.1:٣: expected host:port (a port from 0 to 65535) or unix:/path"),
    ("x\n\x1b[2J:80x", "--listen 'x\\n\\x1b[2J:80x': expected host:port (a port from 0 to 65535) or unix:/path"),
])  # fmt: skip
def test_a_bad_listen_spec_is_one_line(spec: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        listen_socket(spec, None)
    assert str(caught.value) == message


def test_a_unix_path_that_is_a_users_file_is_left_alone(tmp_path: Path) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("the user's own data\n")
    with pytest.raises(UsageError, match=r"^--listen unix:.*precious.txt: cannot bind: "):
        listen_socket(f"unix:{victim}", None)
    assert victim.read_text() == "the user's own data\n"
    stale = tmp_path / "sock"
    listen_socket(f"unix:{stale}", None).close()  # a socket an earlier run left is replaced
    listen_socket(f"unix:{stale}", None).close()


@pytest.mark.parametrize(("address", "loopback"), [
    (("127.0.0.1", 1), True), (("127.255.0.9", 1), True), (("::1", 1, 0, 0), True), (("::ffff:127.0.0.1", 1, 0, 0), True),
    (("0.0.0.0", 1), False), (("::", 1, 0, 0), False), (("10.0.0.1", 1), False), (("fe80::1%eth0", 1, 0, 2), False),
    (("::ffff:10.0.0.1", 1, 0, 0), False), ("/run/zoo.sock", True), (None, False), (("not an ip", 1), False),
])  # fmt: skip
def test_is_loopback(address: Any, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_the_key_is_required_before_anything_is_bound() -> None:
    """The resolved address decides before bind (and the bound one again after): a busy port
    beyond loopback still says what is missing, and nothing ever listens there without a key."""
    busy = socket.create_server(("0.0.0.0", 0))
    try:
        port = busy.getsockname()[1]
        with pytest.raises(UsageError) as caught:
            listen_socket(f"0.0.0.0:{port}", None)
        assert str(caught.value) == f"--listen 0.0.0.0:{port}: listening beyond loopback needs a bearer token (--api-key-file); it binds 0.0.0.0"
    finally:
        busy.close()


@pytest.mark.parametrize(("spec", "message"), [
    ("unix:", "--listen unix:: expected unix:/path, a socket file's path (an empty one would bind an abstract socket, which no file guards)"),
    ("unix:\x00zoo", "--listen 'unix:\\x00zoo': expected unix:/path, a socket file's path (a NUL byte names an abstract socket, or nothing)"),
    ("unix:/run/a\x00b", "--listen 'unix:/run/a\\x00b': expected unix:/path, a socket file's path (a NUL byte names an abstract socket, or nothing)"),
])  # fmt: skip
def test_a_unix_spec_that_names_no_file_is_one_line_and_binds_nothing(spec: str, message: str) -> None:
    """An empty path bound an abstract socket (autobind: a random name, reachable by any local user, no file mode
    to guard it); a NUL byte was a ValueError's traceback."""
    with pytest.raises(UsageError) as caught:
        listen_socket(spec, None)
    assert str(caught.value) == message
