"""The one resident harness: `zoo-agent resident` as a real process, with a NOTIFY_SOCKET of ours
(a datagram socket, as systemd's) that records every message and a log file of its output.

`Resident(world, *flags)` runs it on 127.0.0.1 at a free port for a `World`;
`Resident.on_host(net, hid, root, index, *flags)` runs it as host `hid` of a `Network`, in the
host's namespace at its address (tests/support/netns.py). Tests that start one carry the
`resident` marker (tests/unit/test_test_layout.py checks it)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

from tests.support.notify import Notify

if TYPE_CHECKING:
    from tests.support.netns import Network
    from tests.support.world import World


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Resident:
    """One `zoo-agent resident`: ``proc``, ``notify``, ``url``, ``root``; ``stop()`` returns its output."""

    proc: subprocess.Popen[bytes]

    def __init__(self, world: World, *extra: str, env: dict[str, str] | None = None) -> None:
        self.world, self.port, self.address = world, free_port(), "127.0.0.1"
        self._open(world.root, world.tmp, f"notify-{self.port}.sock", f"resident-{self.port}.log", "local")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zoo_agent", "resident", *world.args("--listen", f"127.0.0.1:{self.port}", *extra)],
            env={**os.environ, "NOTIFY_SOCKET": str(self.notify.path), **(env or {})},
            stdout=self.log, stderr=subprocess.STDOUT, cwd=world.tmp,
        )  # fmt: skip

    @classmethod
    def on_host(cls, net: Network, hid: str, root: Path, index: Path, *extra: str | Path, env: dict[str, str] | None = None) -> Resident:
        """Host ``hid`` of ``net``: in its namespace and process group, listening on the host's address."""
        from tests.support.netns import PORT

        self = cls.__new__(cls)
        host = net.hosts[hid]
        self._open(root, net.work, f"notify-{hid}.sock", f"resident-{hid}.log", hid)
        self.address, self.port = host.address, PORT
        self.proc = net.spawn(hid, sys.executable, "-m", "zoo_agent", "resident", "--root", root, "--index", index, "--host", hid,
                              "--listen", f"{host.address}:{PORT}", *extra, log=self.log,
                              env={"NOTIFY_SOCKET": str(self.notify.path), **(env or {})})  # fmt: skip
        return self

    @property
    def url(self) -> str:
        """Where it listens; follows ``port`` (a test that passes its own ``--listen`` sets ``port``)."""
        return f"http://{self.address}:{self.port}"

    def _open(self, root: Path, work: Path, notify: str, log: str, name: str) -> None:
        self.root, self.name, self.group = root, name, name != "local"  # a host's resident leads its process group
        (work / notify).unlink(missing_ok=True)
        self.notify = Notify(work / notify)
        self.log_path = work / log
        self.log: IO[bytes] = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()

    def worker_pid(self, tenant: str = "t") -> int:
        info = json.loads((self.root / f"resident/tenants/{tenant}/model-info.json").read_text())
        return int(info["pid"])

    def wait(self, predicate: Callable[[dict[str, str]], bool], timeout: float, after: int = 0) -> dict[str, str]:
        """The first sd_notify message (from index ``after`` on) that satisfies ``predicate``;
        fails at once, with the log, when the resident exits first."""

        def found() -> dict[str, str] | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: the resident exited ({self.proc.returncode}); its log: {self.tail()}")
            return next((m for _, m in self.notify.messages[after:] if predicate(m)), None)

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (message := found()) is not None:
                return message
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: no such sd_notify message within {timeout:.0f}s; got {[m for _, m in self.notify.messages[after:]][-5:]}; log: {self.tail()}")

    def wait_ready(self, timeout: float = 180) -> dict[str, str]:
        return self.wait(lambda m: m.get("READY") == "1", timeout)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def tail(self, chars: int = 3000) -> str:
        return self.output()[-chars:]

    def kill(self) -> None:
        """SIGKILL the resident (a host's with its workers: its process group), as a crash would; wait for it."""
        with contextlib.suppress(ProcessLookupError):
            if self.group:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
        self.proc.wait(timeout=30)

    def terminate(self) -> None:
        """SIGTERM, without waiting (``stop`` waits)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60) -> str:
        """SIGTERM, then SIGKILL after ``timeout`` s; close the notify socket and the log; its whole output."""
        self.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        if self.proc.poll() is None or self.group:
            self.kill()  # a host's workers are in its group: none outlives the test
        out = self.output()
        self.notify.sock.close()
        self.log.close()
        return out
