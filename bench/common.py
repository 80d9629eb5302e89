"""Helpers shared by the benchmarks: timing, subprocesses, random files, a resident, the table."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

AGENT = [sys.executable, "-m", "zoo_agent"]
MB = 1 << 20
REQUEST_TIMEOUT = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(fn: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def run(*cmd: str | Path, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, **kw)  # type: ignore[call-overload,no-any-return]


def write_random(path: Path, size: int) -> str:
    """A file of pseudo-random bytes (incompressible), and its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest, block = hashlib.sha256(), os.urandom(MB)
    with open(path, "wb") as f:
        for i in range(size // MB):
            chunk = block[i % 997:] + block[: i % 997]
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


class Resident:
    """`zoo-agent resident` in its own process group, with a NOTIFY_SOCKET of ours (as systemd's)."""

    def __init__(self, work: Path, index: Path, *extra: str) -> None:
        self.port = free_port()
        self.notify_path = work / f"notify-{self.port}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify_path))
        self.log = open(work / f"resident-{self.port}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.start = time.monotonic()
        self.proc = subprocess.Popen([*AGENT, "resident", "--root", str(work / "zoo"), "--index", str(index), "--host", "h",
                                      "--listen", f"127.0.0.1:{self.port}", *extra],
                                     env={**os.environ, "NOTIFY_SOCKET": str(self.notify_path)}, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        self.ready_after: float | None = None

    def wait_ready(self, timeout: float = 300) -> float:
        deadline = self.start + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError(f"resident not READY (exit {self.proc.poll()}); its log: {self.log.name}")
            self.sock.settimeout(min(left, 1.0))
            try:
                if b"READY=1" in self.sock.recv(65536):
                    break
            except TimeoutError:
                continue
        self.ready_after = time.monotonic() - self.start
        threading.Thread(target=self._drain, daemon=True).start()  # keep reading, as systemd does
        return self.ready_after

    def _drain(self) -> None:
        self.sock.settimeout(None)
        try:
            while self.sock.recv(65536):
                pass
        except OSError:
            pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> float:
        """SIGTERM, then the seconds until it exited (what a clean stop takes)."""
        started = time.monotonic()
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
            return time.monotonic() - started
        finally:
            try:  # the group is ours (start_new_session): a worker left behind goes with it
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait(timeout=30)
            self.sock.close()
            self.log.close()



def seconds(value: float) -> str:
    """Seconds for the table: milliseconds below one second, so short operations stay readable."""
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def figure(r: dict[str, object], side: str) -> str:
    """One side of a row ('ours' or 'peer'): a time, a size or a rate."""
    if r.get(f"{side}_text") is not None:
        return str(r[f"{side}_text"])
    if r.get(f"{side}_mb") is not None:
        return f"{float(r[f'{side}_mb']):.0f} MB"  # type: ignore[arg-type]
    return seconds(float(r[f"{side}_s"])) if r.get(f"{side}_s") is not None else "-"  # type: ignore[arg-type]


def markdown(rows: list[dict[str, object]]) -> str:
    lines = ["| benchmark | ours | peer (same run) | peer's figure | ratio | goal |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "-"
        lines.append(f"| {r['name']} | {figure(r, 'ours')} | {str(r['peer']).replace('|', chr(92) + '|')} | {figure(r, 'peer')} | {ratio} | {r['goal']} |")
    return "\n".join(lines)


def table(rows: list[dict[str, object]]) -> str:
    """Ours, the peer's figure from the same run, the ratio, the goal: a time, a size or a rate each."""

    width = max([52, *(len(str(r["name"])) for r in rows)])
    lines = [f"{'benchmark':<{width}} {'ours':>10} {'peer':<30} {'peer figure':>11} {'ratio':>7}  goal", "-" * (width + 80)]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "-"
        lines.append(f"{r['name']:<{width}} {figure(r, 'ours'):>10} {str(r['peer']):<30} {figure(r, 'peer'):>11} {ratio:>7}  {r['goal']}")
    return "\n".join(lines)
