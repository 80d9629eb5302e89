"""A llama.cpp tenant's worker: ``llama-server`` on a private socket, behind our front (issue #33).

The supervisor sees a ``WorkerProcess`` like any other; its events are made here from what the
engine shows, on threads of this object (the supervisor's loop never waits on the engine):

- ``Loading`` as it starts (1%), as its files are read (up to 80%: ``preread``), once its HTTP
  server answers (85%) and once its model is loaded (90%);
- ``Ready`` only after a real one-token generation through the front, the path requests take,
  with the weights and KV bytes of the GGUF fit (``index.fit``); a generation that fails is
  ``Failed`` (its error), and the engine is stopped: a model that loads but cannot generate
  never serves;
- ``Failed`` with its most telling log line when it exits with an error status while loading (a
  deterministic failure: not restarted in a loop); killed by a signal it is a crash, restarted;
- ``Pong`` for a ``ping`` once its ``/health`` answered within ``PROBE_SECONDS`` (a stopped or
  hung process answers nothing: the supervisor replaces it), and only while its decode loop
  advances when requests are in flight (``llamacpp:n_decode_total`` from its ``/metrics``, read
  every few seconds on another thread, as are the counters the pong carries).

Its exit is reported (``poll``) only once its last events are queued, so a ``Failed`` always
comes before the exit it explains. On standby its process waits in a shell that becomes
``llama-server`` at ``proceed`` (it has no runtime to warm without its weights, and starts in
about a second; the pid is there from the start, for the supervisor's cgroup). ``drain``: llama-server
stops at SIGTERM without finishing what is in flight, so the front takes no new request, the
requests in flight finish (up to ``drain_seconds``), then SIGTERM. Its output goes to our log, a
line at a time (at most ``LOG_LINE`` characters), with the tenant's name, at the level
``log_level`` gives (its info lines, several per request, at debug). It dies with the supervisor
(``PR_SET_PDEATHSIG``, set between fork and exec; the kernel sends it when the thread that
started it ends, so it is started from the supervisor's loop, never from a thread of ours).
"""

from __future__ import annotations

import collections
import ctypes
import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from zoo_agent.index.fit import first_gguf, gguf_config, kv_bytes
from zoo_agent.jsonbound import loads
from zoo_agent.resident.config import AdapterConfig, WorkerConfig
from zoo_agent.resident.engines.front import Front
from zoo_agent.resident.engines.llamacpp import LlamaServer, engine_env, server_argv
from zoo_agent.resident.engines.llamalora import adapter_files, lora_argv, loras_for
from zoo_agent.resident.engines.llamasessions import LlamaSessions
from zoo_agent.resident.process import WorkerProcess
from zoo_agent.resident.wire import control as p
from zoo_agent.store.durable import DIR_MODE

__all__ = ["LOAD_SECONDS", "LlamaServerProcess", "log_level", "telling"]

log = logging.getLogger("zoo_agent.resident")

LOAD_SECONDS = 900.0  # from the start to a loaded model (the weights are read from disk here)
WARMUP_SECONDS = 600.0
PROBE_SECONDS = 2.0
METRICS_SECONDS = 10.0
LOG_LINE = 2000
_LEVEL = re.compile(r"^\d+\.\d+\.\d+\.\d+ ([IWEDT]) ")
_METRIC = re.compile(r"^llamacpp:(\w+) ([0-9.eE+-]+)$", re.M)
_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()  # looked up here, in the parent: the child only calls it


def _child_setup(supervisor: int) -> Callable[[], None]:
    """Between fork and exec: die with the supervisor (as our Python workers do, issue #17)."""

    def setup() -> None:
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != supervisor:
            os._exit(70)

    return setup


def log_level(line: str, loading: bool = False) -> tuple[int, str]:
    """A llama-server log line's level in our log, and its text (pure). Its info lines (several per
    request) are our debug; its warnings our info; its errors our errors while it loads (why a load
    failed), our warnings once it serves (a client's prompt past the context is one of them); a line
    without its prefix (an assertion that failed, a warning printed before its log starts) our info."""
    match = _LEVEL.match(line)
    if match is None:
        return logging.INFO, line
    level = {"W": logging.INFO, "E": logging.ERROR if loading else logging.WARNING}.get(match.group(1), logging.DEBUG)
    return level, line[match.end() :]


def telling(lines: list[str]) -> str:
    """Of the last error lines of a failed load, the one that says why (pure): llama.cpp's loader
    says "error loading model: <why>"; else the last error; else the last line."""
    for line in reversed(lines):
        if "error loading model" in line:
            return log_level(line)[1].strip()
    errors = [line for line in lines if log_level(line, loading=True)[0] >= logging.ERROR]
    return log_level((errors or lines or ["(no output)"])[-1])[1].strip()


def _lines(stream: IO[bytes], limit: int) -> Iterator[str]:
    """Lines of at most ``limit`` characters (the rest of a longer one is dropped)."""
    while line := stream.readline(limit):
        if not line.endswith(b"\n"):
            while (rest := stream.readline(limit)) and not rest.endswith(b"\n"):
                pass
        yield line.decode("utf-8", "replace").rstrip()


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def call(path: str, method: str, target: str, timeout: float, body: dict[str, object] | None = None, limit: int = 1 << 20) -> tuple[int | None, bytes]:
    """One HTTP exchange over a unix socket, each step within ``timeout``: (status, at most ``limit``
    bytes of the body), or (None, what went wrong) when there was no answer."""
    conn = _Unix(path, timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, target, body=data, headers={"Content-Type": "application/json"} if data is not None else {})
        response = conn.getresponse()
        return response.status, response.read(limit)
    except (OSError, http.client.HTTPException) as exc:
        return None, f"{type(exc).__name__}: {exc}".encode()
    finally:
        conn.close()


def _message(body: bytes) -> str:
    try:
        return " ".join(str(loads(body)["error"]["message"])[:400].split())
    except (ValueError, KeyError, TypeError):
        return " ".join(body[:400].decode("utf-8", "replace").split())


def slots_dir(sessions_dir: Path | None) -> Path | str:
    """``--slot-save-path``: ``slots/`` in the tenant's state directory, a directory of ours (not a link); else why not."""
    if sessions_dir is None:
        return "no state directory for the tenant"
    slots = sessions_dir / "slots"
    try:
        slots.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        if slots.is_symlink() or not slots.is_dir():
            return f"{slots}: not a directory of ours"
    except OSError as exc:
        return f"{slots}: {exc.strerror or exc}"
    return slots


def preread(version_dir: Path, emit: Callable[[p.ToSupervisor], None], stopped: Callable[[], bool]) -> None:
    """Its GGUF files read once, beside its own start (it maps them; the first generation would
    fault them in from disk with nothing to show): ``Loading`` up to 80% as they are read, so a
    slow disk extends the start's timeout honestly, and the warm-up then finds them in memory."""
    files = sorted(f for f in version_dir.rglob("*.gguf") if f.is_file() and not f.is_symlink())
    total, done, last = sum(f.stat().st_size for f in files) or 1, 0, 1
    buf = bytearray(8 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while (n := f.readinto(buf)) and not stopped():
                done += n
                if (pct := max(1, 80 * done // total)) > last:
                    last = pct
                    emit(p.Loading(pct=pct))


def tokens_per_second(rate: Iterable[tuple[float, float]], window: float = 30.0) -> float:
    """Completion tokens per second over the last ``window`` seconds of (time, tokens_predicted_total) samples."""
    samples = [s for s in rate if time.monotonic() - s[0] <= window]
    if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
        return 0.0
    return float(round((samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0]), 1))


def _journal(stream: IO[bytes], who: str, loading: Callable[[], bool], errors: collections.deque[str]) -> None:
    """llama-server's log lines into ours, at the levels ``log_level`` gives, each named ``who``;
    those at INFO and above kept in ``errors`` (a failed load's reason is among its last)."""
    for line in _lines(stream, LOG_LINE):
        level, text = log_level(line, loading=loading())
        if level >= logging.INFO:
            errors.append(line)
        log.log(level, "%s: %s", who, text)
    stream.close()


class LlamaServerProcess(WorkerProcess):
    """``llama-server`` for one tenant version: the router reaches it at ``path`` (our front), the
    engine listens on ``engine_path`` beside it."""

    def __init__(self, config: WorkerConfig, path: str, server: LlamaServer) -> None:  # no super().__init__: it starts on proceed
        self.path = path
        self.config = config
        self.server = server
        self.engine_path = path.removesuffix(".sock") + "-engine.sock"
        self.front = Front(path, self.engine_path, (config.tenant, config.model), loras_for(config))
        self.front.sessions = LlamaSessions.for_config(config, self.engine_path)
        self._popen: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._events: list[p.ToSupervisor] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._code: int | None = None
        self._exited = threading.Event()
        self._closing = threading.Event()
        self._state = "standby"  # loading, serving, draining
        self._failed = False
        self._errors: collections.deque[str] = collections.deque(maxlen=20)  # its last lines above debug
        self._pinged = threading.Event()
        self._seq = 0
        self._counters: dict[str, float] = {}
        self._progress = time.monotonic()  # its decode loop advanced (or nothing was in flight)
        self._rate: collections.deque[tuple[float, float]] = collections.deque(maxlen=16)
        self._reader: threading.Thread | None = None
        self._model = Path()  # its GGUF file (part 1 of a split set), once found

    @classmethod
    def spawn(cls, config: WorkerConfig, path: str, server: LlamaServer, *, standby: bool = False) -> LlamaServerProcess:
        process = cls(config, path, server)
        process._start()
        if not standby:
            process.proceed()
        return process

    # -- the process ------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self._popen.pid if self._popen is not None else 0

    def poll(self) -> int | None:
        return self._code

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(self.server.path, timeout or 0.0)
        assert self._code is not None
        return self._code

    def terminate(self) -> None:
        if self._popen is None:
            self._finish(0)
        elif self._code is None:
            self._popen.terminate()

    def kill(self) -> None:
        if self._popen is None:
            self._finish(-signal.SIGKILL)
        elif self._code is None:
            self._popen.kill()

    def _start(self) -> None:
        """On the supervisor's loop (see the module's note on PR_SET_PDEATHSIG). The process starts
        now, as a shell that waits for a line on its stdin (``proceed``) and then becomes
        ``llama-server`` (``exec``: the same pid, so the supervisor places it in its cgroup now, and
        the same parent-death signal); closed without that line, it exits."""
        model = first_gguf(self.config.version_dir)
        if model is None:
            self._fail_unstarted(f"no .gguf file in {self.config.version_dir}")
            return
        slots = slots_dir(self.config.sessions_dir)
        if isinstance(slots, str):
            self._fail_unstarted(slots)
            return
        self._model = model
        Path(self.engine_path).unlink(missing_ok=True)
        loras = adapter_files(self.config.adapters)
        if isinstance(loras, str):
            self._fail_unstarted(loras)
            return
        argv = server_argv(self.server.path, self.config, model, self.engine_path, slots) + lora_argv(loras)
        gate = ["/bin/sh", "-c", 'read go || exit 0; exec "$@" </dev/null', "llama-server", *argv]
        try:
            self._popen = subprocess.Popen(gate, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=engine_env(),
                                           preexec_fn=_child_setup(os.getpid()))  # noqa: PLW1509 - see the module's note  # fmt: skip
        except OSError as exc:
            self._fail_unstarted(f"{self.server.path}: {exc}")
            return
        self._reader = threading.Thread(target=self._read_log, name=f"llama-log-{self.config.tenant}", daemon=True)
        self._reader.start()
        threading.Thread(target=self._monitor, name=f"llama-exit-{self.config.tenant}", daemon=True).start()

    def _fail_unstarted(self, error: str) -> None:
        self._failed = True
        self._emit(p.Failed(error=error[:400]))
        self._finish(1)

    def _finish(self, code: int) -> None:
        if self._code is not None:
            return
        self.front.stop()
        self._code = code
        self._exited.set()
        self._wake()

    def _monitor(self) -> None:
        """Its exit, reported once what it said before is read (a failed load's reason comes first)."""
        assert self._popen is not None
        code = self._popen.wait()
        if self._reader is not None:
            self._reader.join(timeout=2.0)
        if self._state == "loading" and not self._failed and code > 0:
            self._emit(p.Failed(error=f"llama-server exited with status {code} while loading: {telling(list(self._errors))}"[:400]))
        self._finish(code)

    def _read_log(self) -> None:
        assert self._popen is not None and self._popen.stdout is not None
        _journal(self._popen.stdout, f"{self.config.tenant} (llama-server {self._popen.pid})", lambda: self._state == "loading", self._errors)

    # -- loading ------------------------------------------------------------------------------
    def _load(self, model: Path) -> None:
        started = time.monotonic()
        self._emit(p.Loading(pct=1))
        try:
            preread(self.config.version_dir, self._emit, lambda: self._code is not None or self._closing.is_set())
        except OSError as exc:
            self._fail(f"{model.name}: {exc.strerror or exc}")
            return
        answered = False
        while True:
            if self._code is not None or self._closing.is_set():
                return
            status, _ = call(self.engine_path, "GET", "/health", PROBE_SECONDS)
            if status == 200:
                break
            if status is not None and not answered:
                answered = True
                self._emit(p.Loading(pct=85))
            if time.monotonic() - started > LOAD_SECONDS:
                self._fail(f"llama-server did not load {model.name} within {LOAD_SECONDS:.0f}s")
                return
            time.sleep(0.1)
        self._emit(p.Loading(pct=90))
        self.front.start()
        prompt = {"model": self.config.tenant, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
        status, body = call(self.path, "POST", "/v1/completions", WARMUP_SECONDS, prompt)
        if status != 200:
            self._fail(f"the warm-up generation failed: {_message(body) if status is not None else body.decode()}")
            return
        with self.front.lock:
            self.front.served = 0  # the warm-up is no request of a client's
        facts = gguf_config(model) or {}
        weights = int(facts.get("gguf_tensor_bytes", 0))
        kv = kv_bytes(facts, dtype="auto", max_batch=self.config.max_batch, max_context=self.config.max_context,
                      cache_type=self.config.kv_cache_type or "f16") if facts else 0  # fmt: skip
        device = f"cpu, {self.config.gpu_layers} layers on the gpu" if self.config.gpu_layers else "cpu"
        self._state = "serving"
        self._progress = time.monotonic()
        self._emit(p.Ready(pid=self.pid, load_seconds=round(time.monotonic() - started, 3), device=device,
                           dtype=str(facts.get("gguf_file_type", "gguf")), weights_bytes=weights, kv_bytes=kv))  # fmt: skip
        threading.Thread(target=self._answer_pings, name=f"llama-ping-{self.config.tenant}", daemon=True).start()
        threading.Thread(target=self._watch_metrics, name=f"llama-metrics-{self.config.tenant}", daemon=True).start()

    def _fail(self, error: str) -> None:
        """A deterministic failure while loading: said first, then the engine stops."""
        self._failed = True
        self._emit(p.Failed(error=error[:400]))
        self.kill()

    # -- serving --------------------------------------------------------------------------------
    def _alive(self) -> bool:
        return self._code is None and not self._closing.is_set()

    def _answer_pings(self) -> None:
        stalled = False
        while self._alive():
            if not self._pinged.wait(timeout=1.0):
                continue
            self._pinged.clear()
            seq = self._seq
            status, _ = call(self.engine_path, "GET", "/health", PROBE_SECONDS)
            if status != 200:
                continue  # no pong: the supervisor replaces it when this lasts
            idle = time.monotonic() - self._progress
            if self.front.inflight and idle > self.config.stall_seconds:
                if not stalled:
                    log.error("%s: no decode step of llama-server in %.0fs with %d requests in flight; not answering pings",
                              self.config.tenant, idle, self.front.inflight)  # fmt: skip
                stalled = True
                continue
            stalled = False
            c = self._counters
            self._emit(p.Pong(seq=seq, served=self.front.served, tokens=int(c.get("tokens_predicted_total", 0)),
                              running=int(c.get("requests_processing", 0)), waiting=int(c.get("requests_deferred", 0)), tps=tokens_per_second(self._rate),
                              sessions=self.front.sessions.count() if isinstance(self.front.sessions, LlamaSessions) else 0))  # fmt: skip

    def _watch_metrics(self) -> None:
        """Its counters and whether its decode loop advances: every 2 s while requests are in flight, else every 15 s.
        (A scrape also restarts the window of llama.cpp's averaged gauges, ``*_seconds``: they cover the time since.)"""
        decoded = -1.0
        while self._alive():
            busy = self.front.inflight > 0
            if not busy:
                self._progress = time.monotonic()
            if self._closing.wait(2.0 if busy else 15.0):
                return
            status, text = call(self.engine_path, "GET", "/metrics", METRICS_SECONDS)
            if status != 200:
                continue
            counters = {name: float(value) for name, value in _METRIC.findall(text.decode("utf-8", "replace"))}
            self._counters = counters
            self._rate.append((time.monotonic(), counters.get("tokens_predicted_total", 0.0)))
            if counters.get("n_decode_total", -1.0) != decoded or not self.front.inflight:
                decoded = counters.get("n_decode_total", -1.0)
                self._progress = time.monotonic()

    # -- WorkerProcess ----------------------------------------------------------------------------
    def _emit(self, event: p.ToSupervisor) -> None:
        with self._lock:
            self._events.append(event)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"!")
        except OSError:
            pass  # full (a wake-up is pending) or closed

    def fileno(self) -> int | None:
        fd = self._wake_r.fileno()
        return fd if fd >= 0 else None

    def read(self) -> list[p.ToSupervisor] | None:
        if self._wake_r.fileno() < 0:
            return None
        for _ in range(64):
            try:
                if not self._wake_r.recv(4096):
                    break
            except OSError:
                break
        with self._lock:
            events, self._events = self._events, []
        return events

    def ping(self, seq: int) -> bool:
        self._seq = seq
        self._pinged.set()
        return True

    def proceed(self) -> bool:
        """The gate opens: it becomes ``llama-server``, which loads the weights; the loading is followed from here."""
        if self._popen is None or self._popen.stdin is None or self._state != "standby" or self._code is not None:
            return self._code is None
        self._state = "loading"
        try:
            self._popen.stdin.write(b"go\n")
            self._popen.stdin.close()
        except OSError:
            return False  # it is gone: its exit says so
        threading.Thread(target=self._load, args=(self._model,), name=f"llama-load-{self.config.tenant}", daemon=True).start()
        return True

    def drain(self) -> bool:
        """No new request; those in flight finish (up to ``drain_seconds``); then SIGTERM (on standby: at once)."""
        if self._popen is None or self._state == "standby":
            self.terminate()
            return True
        self._state = "draining"
        self.front.stop()

        def finish() -> None:
            deadline = time.monotonic() + self.config.drain_seconds
            while self.front.inflight and self._code is None and time.monotonic() < deadline:
                time.sleep(0.05)
            self.terminate()

        threading.Thread(target=finish, name=f"llama-drain-{self.config.tenant}", daemon=True).start()
        return True

    def set_adapters(self, adapters: tuple[AdapterConfig, ...]) -> bool:
        return False  # its adapters are files on its command line: a new set is a new llama-server (reload.follow_adapters)

    def tell_reloads(self, ok: int, failed: int) -> None:
        """llama-server exports its own metrics; ours are the router's."""

    def close(self) -> None:
        self._closing.set()
        self.front.stop()
        Path(self.engine_path).unlink(missing_ok=True)
        self._wake_r.close()
        self._wake_w.close()
