"""The resident's main process: owns the socket, runs workers, talks to systemd (issue #5).

One loop, ticking a few times a second: read worker messages, ping workers, replace
dead or hung ones with backoff, feed the watchdog only from observed progress, follow
``current``, and dispatch the flags that signal handlers set (they do nothing else).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo_agent.errors import UsageError, ZooError
from zoo_agent.index.load import load_index
from zoo_agent.index.model import Index, OllamaSource
from zoo_agent.resident.config import ResidentConfig, WorkerConfig
from zoo_agent.resident.tenant import adapters_for, base_names, selection_for, strict_check
from zoo_agent.store.durable import makedirs_durable, write_atomic
from zoo_agent.store.zoo import Zoo, now
from zoo_agent.systemd.notify import Notifier

__all__ = ["Supervisor", "listen_socket", "read_api_key"]

log = logging.getLogger("zoo_agent.resident")


def _memory_limit(spec: str | None) -> int | None:
    if not spec:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(spec[:-1]) * units[spec[-1]] if spec[-1] in units else int(spec)


def _mem_available() -> int | None:
    """MemAvailable in bytes; None when it cannot be read (a unit with ProcSubset=pid hides
    /proc/meminfo): unknown is a refusal to load beside the old version, never infinity."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def read_api_key(path: Path) -> str:
    """The bearer token: one line of visible ASCII. An empty file silently turned auth off (issue #17)."""
    try:
        key = path.read_bytes().decode("ascii").strip()
    except UnicodeDecodeError:
        raise UsageError(f"--api-key-file {path}: not ASCII; a bearer token is visible ASCII characters") from None
    except OSError as exc:
        raise UsageError(f"--api-key-file {path}: cannot be read: {exc.strerror or exc}") from exc
    if not key:
        raise UsageError(f"--api-key-file {path}: empty; it must hold the bearer token (an empty one would turn auth off)")
    if not all(33 <= ord(c) < 127 for c in key):
        raise UsageError(f"--api-key-file {path}: the token holds spaces or control characters; a bearer token is one word")
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
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(port)))
        except OSError as exc:
            sock.close()
            raise UsageError(f"--listen {spec}: cannot bind: {exc.strerror}") from exc
    sock.listen(128)
    return sock


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    control: socket.socket
    config: WorkerConfig
    started: float = field(default_factory=time.monotonic)
    state: str = "loading"  # loading | ready | draining
    pct: int = 0
    progressed: float = field(default_factory=time.monotonic)  # last loading progress or pong
    ping_sent: float = 0.0
    ping_seq: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    buffer: bytes = b""


class Supervisor:
    def __init__(self, config: ResidentConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notify = notifier or Notifier()
        self.zoo = Zoo(config.root)
        self.api_key = read_api_key(config.api_key_file) if config.api_key_file else None
        self.selector = selectors.DefaultSelector()
        self.serving: Worker | None = None
        self.incoming: Worker | None = None  # a new version loading beside the serving one
        self.retiring: list[Worker] = []  # drained after a swap; reaped when they exit
        self.started_at = now()
        self.served_before = self.tokens_before = 0  # counts of workers that are gone
        self.gap_from: str | None = None  # set during a stop-first reload
        self.gap_open = False
        self.crashes: list[float] = []
        self.restart_at = 0.0
        self.flags: set[str] = set()
        self.exit_code: int | None = None
        self.reloads = 0
        self.reload_attempts = 0
        self.last_error = ""
        self.swaps: list[dict[str, Any]] = []
        self.watchdog_usec = self._watchdog_usec()
        self.last_watchdog = 0.0
        self.last_watch = 0.0
        self.last_status = ""
        self.last_status_at = 0.0
        self.listener: socket.socket | None = None

    # -- signals: record only --------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.flags.add("term"))
        signal.signal(signal.SIGINT, lambda *_: self.flags.add("term"))
        signal.signal(signal.SIGHUP, lambda *_: self.flags.add("hup"))

    @staticmethod
    def _watchdog_usec() -> int:
        pid = os.environ.get("WATCHDOG_PID")
        if pid and pid != str(os.getpid()):
            return 0
        return int(os.environ.get("WATCHDOG_USEC", "0") or 0)

    # -- what to serve ------------------------------------------------------------------
    def worker_config(self) -> WorkerConfig:
        idx: Index = load_index(self.config.index, str(self.config.index))
        host = idx.hosts.get(self.config.host.lower())
        if host is None or host.resident is None:
            raise UsageError(f"host '{self.config.host}' has no resident tenant in {self.config.index}")
        tenant = idx.tenants[host.resident]
        model = idx.models[tenant.model]
        if self.config.strict:
            strict_check(self.zoo, idx, host.resident)
        version = self.zoo.read_link("models", tenant.model, "current")
        if version is None or not self.zoo.version_dir("models", tenant.model, version).is_dir():
            raise UsageError(f"model {tenant.model} is not in the zoo at {self.config.root}; run: zoo-agent apply")
        adapters, refused = adapters_for(self.zoo, idx, host.resident)
        for why in refused.values():
            log.warning("adapter refused: %s", why)
        return WorkerConfig(
            tenant=host.resident, model=tenant.model, version=version,
            version_dir=self.zoo.version_dir("models", tenant.model, version),
            allow_pickle=model.allow_pickle, allow_code=model.allow_code,
            device=tenant.resources.device, dtype=tenant.resources.dtype,
            defaults=tenant.generation.model_dump(), max_queue=tenant.resources.max_queue, max_batch=tenant.resources.max_batch,
            api_key=self.api_key, drain_seconds=self.config.drain_seconds, memory_max=tenant.resources.memory_max,
            adapters=adapters, refused_adapters=refused, max_loras=tenant.resources.max_loras,
            base_names=base_names(idx, host.resident), selection=selection_for(self.zoo, idx, host.resident),
            sessions_dir=self.zoo.tenant_dir(host.resident),
            backend=tenant.backend, ollama_model=model.source.name if isinstance(model.source, OllamaSource) else None,
        )  # fmt: skip

    def spawn(self, config: WorkerConfig) -> Worker:
        assert self.listener is not None
        ours, theirs = socket.socketpair()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_"))}
        proc = subprocess.Popen(
            [sys.executable, "-m", "zoo_agent.resident.worker", "--listen-fd", str(self.listener.fileno()), "--control-fd", str(theirs.fileno()),
             "--supervisor-pid", str(os.getpid())],
            pass_fds=(self.listener.fileno(), theirs.fileno()), env=env,
        )  # fmt: skip
        theirs.close()
        ours.sendall((config.model_dump_json() + "\n").encode())
        ours.setblocking(False)
        worker = Worker(proc, ours, config)
        self.selector.register(ours, selectors.EVENT_READ, worker)
        log.info("worker %d: loading %s@%s", proc.pid, config.model, config.version)
        return worker

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        try:
            config = self.worker_config()
            self.listener = listen_socket(self.config.listen, self.api_key)
        except ZooError as exc:
            self.notify.failed(errno.EINVAL, f"cannot start: {exc}")
            raise
        self.notify.extend_timeout(30, f"loading {config.model}@{config.version}")
        self.serving = self.spawn(config)
        while self.exit_code is None:
            for key, _ in self.selector.select(timeout=0.2):
                if key.data == "listener":
                    self._refuse_one()
                else:
                    self._read(key.data)
            self.tick()
        self._close()
        return self.exit_code

    def tick(self) -> None:
        t = time.monotonic()
        if "term" in self.flags:
            self.flags.discard("term")
            self.handle_term()
            return
        if "hup" in self.flags:
            self.flags.discard("hup")
            self.handle_hup()
        for worker in [w for w in (self.serving, self.incoming) if w is not None]:
            self._check(worker, t)
        for worker in list(self.retiring):
            if (code := worker.proc.poll()) is not None:
                self.retiring.remove(worker)
                self._exited(worker, code)
        if self.serving is None and self.incoming is None and not self.retiring and self.exit_code is None and t >= self.restart_at:
            self._restart()
        self._answer_gap(self.serving is None or self.serving.state != "ready")
        if t - self.last_watch >= self.config.watch_interval and self.serving is not None and self.serving.state == "ready":
            self.last_watch = t
            current = self.zoo.read_link("models", self.serving.config.model, "current")
            if current and current != self.serving.config.version and self.incoming is None:
                log.info("current of %s moved to %s: reloading", self.serving.config.model, current)
                self.handle_hup()
            elif self.incoming is None:
                self._follow_adapters(self.serving)
        self._feed_watchdog(t)
        if self.serving is not None and self.serving.state == "ready" and self.incoming is None and t - self.last_status_at >= 5:
            self.last_status_at = t
            if (line := self.status_line()) != self.last_status:
                self.last_status = line
                self.notify.status(line)  # what an operator reads in `systemctl status`
                self._write_lease(self.serving)

    def _read(self, worker: Worker) -> bool:
        """Handle what the worker sent; False once nothing more is there (for now, or ever)."""
        try:
            data = worker.control.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        if not data:
            try:
                self.selector.unregister(worker.control)
            except (KeyError, ValueError):
                pass
            return False
        worker.buffer += data
        while b"\n" in worker.buffer:
            line, worker.buffer = worker.buffer.split(b"\n", 1)
            self._message(worker, json.loads(line))
        return True

    def _message(self, worker: Worker, message: dict[str, Any]) -> None:
        worker.progressed = time.monotonic()
        if "pong" in message:
            if message["pong"] == worker.ping_seq:
                worker.ping_sent = 0.0
            worker.stats = message
            return
        event = message.get("event")
        if event == "loading" and message["pct"] > worker.pct:
            worker.pct = message["pct"]
            # Only while loading progresses: a stalled load still times out.
            self.notify.extend_timeout(30, f"{'reloading' if self.serving and worker is self.incoming else 'loading'} {worker.config.model}@{worker.config.version}: {worker.pct}%")
        elif event == "failed":
            worker.error = message["error"]
        elif event == "ready":
            worker.state = "ready"
            self._became_ready(worker, message)

    def _became_ready(self, worker: Worker, message: dict[str, Any]) -> None:
        old = self.serving if worker is self.incoming else None
        if self.gap_from is not None:  # a stop-first reload just finished
            self.swaps.append({"time": now(), "from": self.gap_from, "to": worker.config.version, "reason": "reload (stop first)",
                               "seconds": round(time.monotonic() - worker.started, 3)})  # fmt: skip
            self.reloads += 1
            self.gap_from = None
        if old is not None:
            self._drain(old)
            self.retiring.append(old)
            self.served_before += int(old.stats.get("served", 0))
            self.tokens_before += int(old.stats.get("tokens", 0))
            self.swaps.append({"time": now(), "from": old.config.version, "to": worker.config.version, "reason": "reload",
                               "seconds": round(time.monotonic() - worker.started, 3)})  # fmt: skip
            self.serving, self.incoming = worker, None
            self.reloads += 1
        self._write_tenant_files(worker, message)
        self._tell_reloads()
        self.notify.ready(self.status_line())
        log.info("worker %d: serving %s@%s (%s)", worker.proc.pid, worker.config.model, worker.config.version, self.status_line())

    def _check(self, worker: Worker, t: float) -> None:
        code = worker.proc.poll()
        if code is not None:
            self._exited(worker, code)
            return
        if worker.state != "ready":
            return
        if worker.ping_sent and t - worker.ping_sent > self.config.ping_timeout:
            log.error("worker %d: no answer to a ping for %.0fs; replacing it", worker.proc.pid, t - worker.ping_sent)
            worker.proc.kill()
            return
        if not worker.ping_sent and t - worker.progressed >= self.config.ping_interval:
            worker.ping_seq += 1
            worker.ping_sent = t
            try:
                worker.control.sendall((json.dumps({"ping": worker.ping_seq}) + "\n").encode())
            except OSError:
                pass

    def _exited(self, worker: Worker, code: int) -> None:
        while self._read(worker):  # a "failed" sent just before the exit decides what the exit means
            pass
        try:
            self.selector.unregister(worker.control)
        except (KeyError, ValueError):
            pass
        worker.control.close()
        if worker.state == "draining":
            log.info("worker %d: drained and stopped (exit %d)", worker.proc.pid, code)
            return
        reason = worker.error or f"exit status {code}"
        if worker is self.incoming:
            self.incoming = None
            self.last_error = f"reload to {worker.config.model}@{worker.config.version} failed: {reason}"
            self._write_state()
            self._tell_reloads()
            log.error("reload to %s@%s failed: %s; still serving %s", worker.config.model, worker.config.version, reason,
                      self.serving.config.version if self.serving else "nothing")  # fmt: skip
            self.notify.ready(f"reload to {worker.config.model}@{worker.config.version} failed: {reason}; " + self.status_line())
            return
        self.serving = None
        self.served_before += int(worker.stats.get("served", 0))
        self.tokens_before += int(worker.stats.get("tokens", 0))
        if worker.state == "loading" and worker.error:
            # Deterministic (weights that cannot load): retrying would only loop.
            self.notify.failed(errno.EIO, f"cannot load {worker.config.model}@{worker.config.version}: {reason}")
            log.error("cannot load %s@%s: %s", worker.config.model, worker.config.version, reason)
            self.exit_code = 1
            return
        t = time.monotonic()
        self.crashes = [c for c in self.crashes if t - c < self.config.crash_window] + [t]
        if len(self.crashes) >= self.config.max_crashes:
            self.notify.failed(errno.ECHILD, f"worker crashed {len(self.crashes)} times in {self.config.crash_window:.0f}s; last: {reason}")
            log.error("worker crashed %d times in %.0fs; giving up (last: %s)", len(self.crashes), self.config.crash_window, reason)
            self.exit_code = 1
            return
        delay = min(2 ** (len(self.crashes) - 1), 30)
        self.restart_at = t + delay
        self.notify.status(f"worker died ({reason}); restarting in {delay}s")
        log.error("worker %d died (%s); restarting in %ds", worker.proc.pid, reason, delay)

    def _restart(self) -> None:
        try:
            self.serving = self.spawn(self.worker_config())
        except UsageError as exc:
            self.notify.failed(errno.ENOENT, str(exc))
            self.exit_code = 1

    def _drain(self, worker: Worker) -> None:
        worker.state = "draining"
        try:
            worker.control.sendall(b'{"drain": true}\n')
        except OSError:
            worker.proc.terminate()

    def _fits_beside(self, config: WorkerConfig) -> bool:
        """Can the new version load while the old one still serves?"""
        need = sum(p.stat().st_size for p in config.version_dir.rglob("*.safetensors")) * 1.2
        limit = _memory_limit(config.memory_max)
        if limit is not None:
            used = _rss(self.serving.proc.pid) if self.serving else 0
            return used + need <= limit
        available = _mem_available()
        if available is None:
            log.warning("MemAvailable is unreadable (/proc/meminfo hidden?); reloading stop-first, as if the new version did not fit")
            return False
        return need <= available

    def _answer_gap(self, gap: bool) -> None:
        """While no worker serves (a stop-first reload, a restart), answer 503 + Retry-After
        ourselves instead of leaving clients in the backlog with no word."""
        if self.listener is None or gap == self.gap_open or self.exit_code is not None:
            return
        self.gap_open = gap
        if gap:
            self.listener.setblocking(False)
            self.selector.register(self.listener, selectors.EVENT_READ, "listener")
        else:
            self.selector.unregister(self.listener)

    def _refuse_one(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        state = "reloading" if self.gap_from is not None else "loading"
        body = json.dumps({"state": state, "error": {"message": f"{state} the model; retry", "type": "server_error", "param": None, "code": state}}).encode()
        try:
            conn.settimeout(1.0)
            conn.recv(65536)  # the request head; its content does not matter
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
                         b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
        except OSError:
            pass
        finally:
            conn.close()

    def _feed_watchdog(self, t: float) -> None:
        """WATCHDOG=1 only when a worker provably made progress since the last one."""
        if not self.watchdog_usec:
            return
        interval = self.watchdog_usec / 2e6
        if t - self.last_watchdog < interval:
            return
        alive = [w for w in (self.serving, self.incoming) if w is not None and t - w.progressed < interval * 2]
        if alive:
            self.notify.watchdog()
            self.last_watchdog = t

    # -- flags --------------------------------------------------------------------------------
    def handle_hup(self) -> None:
        if self.incoming is not None or self.serving is None or self.serving.state != "ready":
            return
        try:
            config = self.worker_config()
        except Exception as exc:  # noqa: BLE001 - a bad index or zoo keeps the old version serving
            self.reload_attempts += 1
            self.last_error = f"reload refused: {exc}"
            self._write_state()
            self.notify.status(f"reload refused: {exc}; " + self.status_line())
            log.error("reload refused: %s", exc)
            return
        self.reload_attempts += 1
        self.notify.reloading(f"reloading {config.model}@{config.version}")
        if self._fits_beside(config):
            self.incoming = self.spawn(config)
        else:
            # Two versions do not fit: stop the old one first; the gap answers 503 + Retry-After.
            old, self.serving = self.serving, None
            log.info("memory does not allow two versions at once: stopping %s before loading %s", old.config.version, config.version)
            self._drain(old)
            self.retiring.append(old)
            self.gap_from = old.config.version
            self.restart_at = 0.0
        self._write_state()

    def handle_term(self) -> None:
        self.notify.stopping(f"stopping; finishing in-flight requests (up to {self.config.drain_seconds:.0f}s)")
        for worker in [w for w in (self.incoming, self.serving) if w is not None]:
            self._drain(worker)
        deadline = time.monotonic() + self.config.drain_seconds + 5
        for worker in [w for w in (self.incoming, self.serving, *self.retiring) if w is not None]:
            try:
                worker.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
        self.serving = self.incoming = None
        self.exit_code = 0

    # -- reporting ------------------------------------------------------------------------------
    def status_line(self) -> str:
        w = self.serving
        if w is None:
            return "no worker"
        s = w.stats
        served = self.served_before + int(s.get("served", 0))  # since the resident started, across swaps
        line = (f"{w.config.tenant}: {w.config.model}@{w.config.version}; {s.get('running', 0)} running, {s.get('waiting', 0)} waiting, "
                f"{s.get('tps', 0.0):.1f} tok/s, {served} requests")  # fmt: skip
        if loaded := s.get("adapters"):
            line += f"; adapters {','.join(loaded)}"
        if refused := s.get("refused"):
            line += f"; refused {','.join(sorted(refused))}"
        if sessions := s.get("sessions"):
            line += f"; {sessions} session{'s' if sessions != 1 else ''}"
        return line

    def _write_tenant_files(self, worker: Worker, ready: dict[str, Any]) -> None:
        base = self.zoo.tenant_dir(worker.config.tenant)
        base.mkdir(parents=True, exist_ok=True)
        info = {"tenant": worker.config.tenant, "model": worker.config.model, "version": worker.config.version,
                "backend": worker.config.backend, "device": ready.get("device"), "dtype": ready.get("dtype"),
                "load_seconds": ready.get("load_seconds"), "pid": ready.get("pid"), "since": now()}  # fmt: skip
        write_atomic(base / "model-info.json", (json.dumps(info, indent=2) + "\n").encode())
        self._write_lease(worker)
        self.last_error = ""
        self._write_state()

    def _write_lease(self, worker: Worker) -> None:
        """Since when this resident serves the tenant, what it served, and every swap."""
        served = self.served_before + int(worker.stats.get("served", 0))
        tokens = self.tokens_before + int(worker.stats.get("tokens", 0))
        lease = {"since": self.started_at, "supervisor_pid": os.getpid(), "requests": served, "tokens_generated": tokens, "swaps": self.swaps}
        path = self.zoo.tenant_dir(worker.config.tenant) / "lease.json"
        write_atomic(path, (json.dumps(lease, indent=2) + "\n").encode())

    def _follow_adapters(self, worker: Worker) -> None:
        """An adapter's `current` moved (or a refused one arrived): the worker swaps it in place, no restart."""
        config = worker.config
        ids = [a.id for a in config.adapters] + list(config.refused_adapters)
        serving = {a.id: a.version for a in config.adapters}
        if all(self.zoo.read_link("loras", aid, "current") == serving.get(aid) for aid in ids):
            return
        try:
            idx = load_index(self.config.index, str(self.config.index))
            adapters, refused = adapters_for(self.zoo, idx, config.tenant)
        except (ZooError, KeyError) as exc:
            log.warning("adapters not followed: %s", exc)
            return
        worker.config = config.model_copy(update={"adapters": adapters, "refused_adapters": refused})
        if adapters != config.adapters:
            log.info("adapters now %s: swapping in place", ", ".join(a.label for a in adapters) or "none")
            message = {"adapters": [a.model_dump(mode="json") for a in adapters]}
            try:
                worker.control.sendall((json.dumps(message) + "\n").encode())
            except OSError as exc:
                log.warning("could not tell worker %d about new adapters: %s", worker.proc.pid, exc)

    def _tell_reloads(self) -> None:
        """zoo:reloads_total{result} lives in the serving worker's /metrics; only we know."""
        if self.serving is not None:
            message = {"reloads": {"ok": self.reloads, "failed": self.reload_attempts - self.reloads}}
            try:
                self.serving.control.sendall((json.dumps(message) + "\n").encode())
            except OSError:
                pass

    def _write_state(self) -> None:
        """What `zoo-agent resident reload` waits on."""
        w = self.serving
        state = {"pid": os.getpid(), "attempts": self.reload_attempts, "reloads": self.reloads, "last_error": self.last_error,
                 "state": "reloading" if self.incoming else "ready", "version": w.config.version if w else None}  # fmt: skip
        makedirs_durable(self.zoo.resident_dir)
        write_atomic(self.zoo.resident_state, (json.dumps(state) + "\n").encode())

    def _close(self) -> None:
        for worker in (self.serving, self.incoming, *self.retiring):
            if worker is not None and worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()
        if self.listener is not None:
            self.listener.close()
