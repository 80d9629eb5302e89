"""A fleet on one machine (issue #22): one network namespace per host, veth pairs on a
private bridge, a hub-compatible mirror in a namespace of its own, and a resident per host
(``Resident.on_host`` in tests/support/resident.py).

Used by tests/integration/test_fleet.py and bench/delegation.py. Standard library only
(the residents are real ``zoo-agent`` processes), so a benchmark imports it without pytest.

Layout: namespace ``<prefix>-br`` holds bridge ``br0``; each host ``<h>`` gets namespace
``<prefix>-<h>`` with ``eth0`` at ``10.77.0.<n>/24`` (its peer ``p<n>`` is a port of the
bridge) and ``lo`` up; the mirror is ``<prefix>-mirror`` at ``10.77.0.254``. Every address
lives only inside these namespaces: the root namespace gets no interface and no route, so
nothing the test starts can reach, or be reached from, anything outside.

How the test talks into a namespace: a thread that called ``setns(CLONE_NEWNET)`` opens its
sockets there (a network namespace is per thread in Linux, and a socket stays in the one it
was created in), so the client is the test's own httpx in such a thread (``call``, ``pool``).
Processes run under ``ip netns exec``, which execs in place: the pid is the process's own.
Unix sockets (the residents' NOTIFY_SOCKET) are paths in the file system, which namespaces
of the network kind do not separate.

Everything is bounded: every wait has a deadline, every subprocess a timeout; ``close()``
kills every process group started here and deletes every namespace, also after a failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

__all__ = ["MIRROR_ADDRESS", "PORT", "SUBNET", "Host", "Network", "network", "unavailable", "wait_until"]

SUBNET = "10.77.0"  # a /24 nothing on these machines uses (checked with `ip -o addr`); it exists only in our namespaces
MIRROR_ADDRESS = f"{SUBNET}.254"
PORT = 8000  # every host has a port space of its own
_CLONE_NEWNET = 0x40000000
_NETNS_DIR = Path("/run/netns")
_PREFIX = "zoofleet"
_REPO = Path(__file__).resolve().parent.parent.parent

T = TypeVar("T")


def unavailable() -> str | None:
    """Why the fleet cannot be built here (a skip reason), or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"{_PREFIX}-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _enter(namespace: str) -> None:
    """Move the calling thread (only it) into the namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(_NETNS_DIR / namespace, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({namespace}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def _sweep() -> None:
    """Namespaces left by an earlier run that was killed before its cleanup (its pid is gone)."""
    if not _NETNS_DIR.is_dir():
        return
    for path in _NETNS_DIR.glob(f"{_PREFIX}*-*"):
        pid = path.name.removeprefix(_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            subprocess.run(["ip", "netns", "del", path.name], capture_output=True, timeout=30)


@dataclass(frozen=True)
class Host:
    """One host of the fleet: its id, namespace, address and interface on the bridge."""

    id: str
    namespace: str
    address: str
    bridge_port: str

    @property
    def url(self) -> str:
        return f"http://{self.address}:{PORT}"


@dataclass
class Network:
    """The bridge, the hosts' namespaces and the processes started in them."""

    work: Path
    prefix: str = field(default_factory=lambda: f"{_PREFIX}{os.getpid()}")
    hosts: dict[str, Host] = field(default_factory=dict)
    _namespaces: list[str] = field(default_factory=list)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _sweep()
        self.bridge = self._namespace("br")
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge, "link", "set", "br0", "up")

    def _namespace(self, name: str) -> str:
        namespace = f"{self.prefix}-{name}"
        _ip("netns", "add", namespace)
        self._namespaces.append(namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")
        return namespace

    def add(self, hid: str, address: str | None = None) -> Host:
        """A namespace for host ``hid`` on the bridge, at the next free address (or ``address``)."""
        taken = [int(h.address.rsplit(".", 1)[1]) for h in self.hosts.values()]
        address = address or f"{SUBNET}.{max([0, *(n for n in taken if n < 254)]) + 1}"
        namespace, port = self._namespace(hid), f"p{address.rsplit('.', 1)[1]}"
        # made inside the namespaces: no interface ever appears in the root namespace
        _ip("link", "add", "eth0", "netns", namespace, "type", "veth", "peer", "name", port, "netns", self.bridge)
        _ip("-n", self.bridge, "link", "set", port, "master", "br0")
        _ip("-n", self.bridge, "link", "set", port, "up")
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        self.hosts[hid] = host = Host(hid, namespace, address, port)
        return host

    def link(self, hid: str, up: bool) -> None:
        """Cut (or restore) the host's cable: its port on the bridge goes down; the host keeps its address."""
        _ip("-n", self.bridge, "link", "set", self.hosts[hid].bridge_port, "up" if up else "down")

    # -- running things in a namespace ------------------------------------------------

    def call(self, hid: str, fn: Callable[[], T], timeout: float = 60) -> T:
        """``fn()`` in a fresh thread inside the host's namespace (its sockets are the host's)."""
        pool = self.pool(hid, 1)
        try:
            return pool.submit(fn).result(timeout=timeout)
        finally:
            pool.shutdown(wait=False)  # after a timeout, the thread is left to its own socket timeouts

    def pool(self, hid: str, workers: int) -> ThreadPoolExecutor:
        """Threads inside the host's namespace, for concurrent clients (the caller shuts it down)."""
        return ThreadPoolExecutor(workers, thread_name_prefix=f"netns-{hid}", initializer=_enter, initargs=(self.hosts[hid].namespace,))

    def argv(self, hid: str, *argv: str | Path) -> list[str]:
        """The command line that runs ``argv`` in the host's namespace, with this checkout's code first."""
        python_path = os.pathsep.join(p for p in (str(_REPO), os.environ.get("PYTHONPATH", "")) if p)
        return ["ip", "netns", "exec", self.hosts[hid].namespace, "env", f"PYTHONPATH={python_path}", *map(str, argv)]

    def run(self, hid: str, *argv: str | Path, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run to completion in the host's namespace (bounded); the caller checks the exit code."""
        return subprocess.run(self.argv(hid, *argv), capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})

    def spawn(self, hid: str, *argv: str | Path, log: IO[bytes], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start in the host's namespace, in a process group of its own (killed by ``close``)."""
        proc = subprocess.Popen(self.argv(hid, *argv), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True, cwd=self.work)  # fmt: skip
        self._procs.append(proc)
        return proc

    def serve_in(self, name: str, address: str, make: Callable[[str], T], start: Callable[[T], Callable[[], None]]) -> T:
        """A server object of this process, bound inside a namespace of its own at ``address``:
        ``make(address)`` runs in a thread in that namespace (the listening socket is made
        there), ``start(server)`` starts it and returns how to stop it (called by ``close``)."""
        self.add(name, address)
        server = self.call(name, lambda: make(address))
        self._closers.append(start(server))
        return server

    def close(self) -> None:
        """Kill every process group started here, stop the servers, delete every namespace."""
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        for stop in reversed(self._closers):
            with contextlib.suppress(Exception):
                stop()
        for namespace in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        self._procs.clear()
        self._closers.clear()
        self._namespaces.clear()


def wait_until(what: str, predicate: Callable[[], T], timeout: float, every: float = 0.1) -> T:
    """Poll ``predicate`` until it returns something truthy; raise naming ``what`` after ``timeout`` s."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # noqa: BLE001 - a failing probe is a "not yet", reported if it never passes
            last = exc  # type: ignore[assignment]
        else:
            if last:
                return last
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s (last: {last!r})")


@contextlib.contextmanager
def network(work: Path) -> Iterator[Network]:
    """A ``Network`` that is closed on the way out, however the block ends."""
    net = Network(work)
    try:
        yield net
    finally:
        net.close()
