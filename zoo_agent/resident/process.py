"""One process that serves one tenant version, as the supervisor sees it (issue #32).

``WorkerProcess`` is the seam between the supervisor and an engine, shaped like uvicorn's
``Process`` (start, is-alive, terminate, kill, join): the supervisor never reaches past it. What
it asks of any engine is small and engine-neutral: a private address the router forwards to,
events (loading progress, ready after a real generation, failed, progress for the watchdog),
a liveness probe, a graceful drain and a hard stop. The events are the control protocol's
messages (``wire.control``), whoever produces them: our Python worker sends them over its
control socket (``ZooWorkerProcess``); an engine's own server has them made from what it shows
(its health endpoint, its log).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from abc import ABC, abstractmethod
from pathlib import Path

from pydantic import ValidationError

from zoo_agent.resident.config import AdapterConfig, WorkerConfig
from zoo_agent.resident.wire import control as p

__all__ = ["Unintelligible", "WorkerProcess", "ZooWorkerProcess"]

log = logging.getLogger("zoo_agent.resident")


class Unintelligible(Exception):
    """The process said something its protocol does not know: it is replaced, not trusted."""


class WorkerProcess(ABC):
    """A supervised child serving one tenant version at ``path`` (a unix socket only the router reaches)."""

    def __init__(self, popen: subprocess.Popen[bytes], path: str) -> None:
        self.popen = popen
        self.path = path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        """Its exit status, or None while it runs."""
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Raises ``subprocess.TimeoutExpired`` past ``timeout``."""
        return self.popen.wait(timeout)

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()

    @abstractmethod
    def fileno(self) -> int | None:
        """What the supervisor's selector waits on for events (None: looked at every tick)."""

    @abstractmethod
    def read(self) -> list[p.ToSupervisor] | None:
        """Events since the last read; [] when none yet, None when none will ever come (closed).
        Raises ``Unintelligible`` on what no event can be made of."""

    @abstractmethod
    def ping(self, seq: int) -> bool:
        """Ask for a sign of life: a ``Pong`` with ``seq`` (and the counters) comes as an event."""

    @abstractmethod
    def proceed(self) -> bool:
        """Load the weights now (it was started on standby: the runtime only)."""

    @abstractmethod
    def drain(self) -> bool:
        """Finish in-flight requests, take no new ones, exit. False: it could not be told (stop it)."""

    @abstractmethod
    def set_adapters(self, adapters: tuple[AdapterConfig, ...]) -> bool:
        """Swap the adapters in place; False where the engine cannot (restart it instead)."""

    @abstractmethod
    def tell_reloads(self, ok: int, failed: int) -> None:
        """The resident's reload counters, for engines that export our metrics."""

    @abstractmethod
    def close(self) -> None:
        """Release what the supervisor holds of it (after it exited, or was killed)."""


class ZooWorkerProcess(WorkerProcess):
    """Our Python worker (``resident.worker.main``): transformers, peft or an Ollama daemon behind
    it, told what to serve and heard from over a private control socket pair."""

    def __init__(self, popen: subprocess.Popen[bytes], path: str, control: socket.socket) -> None:
        super().__init__(popen, path)
        self.control = control
        self.lines = p.Lines()

    @classmethod
    def spawn(cls, config: WorkerConfig, path: str, *, standby: bool = False) -> ZooWorkerProcess:
        """A worker listening on ``path`` (its backlog holds connections while it loads)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(128)
        ours, theirs = socket.socketpair()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_"))}
        try:
            popen = subprocess.Popen(
                [sys.executable, "-m", "zoo_agent.resident.worker.main", "--listen-fd", str(listener.fileno()),
                 "--control-fd", str(theirs.fileno()), "--supervisor-pid", str(os.getpid())],
                pass_fds=(listener.fileno(), theirs.fileno()), env=env,
            )  # fmt: skip
        finally:
            theirs.close()
            listener.close()  # the worker holds it now
        ours.sendall(p.encode(p.Configure(config=config)) + (b"" if standby else p.encode(p.Proceed())))
        ours.setblocking(False)
        return cls(popen, path, ours)

    def fileno(self) -> int | None:
        return self.control.fileno() if self.control.fileno() >= 0 else None

    def read(self) -> list[p.ToSupervisor] | None:
        events: list[p.ToSupervisor] = []
        for _ in range(64):  # what is there now; the rest at the next wake-up
            try:
                data = self.control.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                return events or None  # closed: a later read says so again
            for line in self.lines.feed(data):
                try:
                    events.append(p.to_supervisor(line))
                except ValidationError as exc:
                    raise Unintelligible(exc.errors()[0]["msg"]) from None
        return events

    def _send(self, message: p.ToWorker) -> bool:
        try:
            self.control.sendall(p.encode(message))
            return True
        except OSError:
            return False

    def ping(self, seq: int) -> bool:
        return self._send(p.Ping(seq=seq))

    def proceed(self) -> bool:
        return self._send(p.Proceed())

    def drain(self) -> bool:
        return self._send(p.Drain())

    def set_adapters(self, adapters: tuple[AdapterConfig, ...]) -> bool:
        return self._send(p.Adapters(adapters=adapters))

    def tell_reloads(self, ok: int, failed: int) -> None:
        self._send(p.Reloads(ok=ok, failed=failed))

    def close(self) -> None:
        self.control.close()
        Path(self.path).unlink(missing_ok=True)
