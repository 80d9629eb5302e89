"""Metrics of the oneshot commands as node_exporter textfile-collector files (issue #25).

``apply``, ``verify`` and ``gc`` run and exit, so nothing could scrape them; the
ecosystem's convention for batch jobs is a ``*.prom`` file that node_exporter's textfile
collector reads on every scrape. One file per command (``model-zoo-apply.prom``, ...),
replaced with ``write_atomic`` so that a scrape sees the previous run's file or this
one's, never half of one (node_exporter reads it while we write).

What goes in: counts, bytes, seconds, timestamps and ids from the index (escaped as the
text format wants). Never a path or a token: nothing here reads the environment but the
directory's name.

A run that found the lock held (exit 75) writes nothing: it did nothing, and the run
holding the lock writes its own result. A file that cannot be written is logged and never
fails the command: metrics are not worth a failed reconcile.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo_agent.errors import LockHeld, ZooError
from zoo_agent.plan import Action
from zoo_agent.reconcile.apply import Result
from zoo_agent.store.durable import write_atomic

__all__ = ["ENV", "STATES", "Recorder", "escape_label", "file_name", "recording", "render", "state_of"]

log = logging.getLogger("zoo_agent")

ENV = "ZOO_TEXTFILE_DIR"

# artifact_status()'s states, by their first word (the rest names files or versions).
STATES = ("ok", "missing", "outdated", "drifted", "broken", "on-demand", "undeclared")

# Readable by node_exporter, which runs as another user; the file holds nothing secret.
_MODE = 0o644


def file_name(command: str) -> str:
    return f"model-zoo-{command}.prom"


def escape_label(value: str) -> str:
    """A label value as the text exposition format writes it: '\\', '"' and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def state_of(state: str) -> str:
    """artifact_status()'s state as one of STATES ("drifted: a, b" -> "drifted")."""
    head = state.split(":", 1)[0]
    return head if head in STATES else "broken"


@dataclass
class Recorder:
    """What one run of a command reports; filled in by the command as it learns things."""

    command: str
    host: str
    samples: dict[str, tuple[str, list[tuple[dict[str, str], float]]]] = field(default_factory=dict)
    artifacts: Callable[[], list[dict[str, Any]]] | None = None  # read when the run ends

    def set(self, name: str, help_: str, value: float, **labels: str) -> None:
        metric = f"zoo_{self.command}_{name}" if not name.startswith("zoo_") else name
        self.samples.setdefault(metric, (help_, []))[1].append((labels, float(value)))

    def result(self, result: Result) -> None:
        """Steps and bytes of an apply() result (apply and gc; verify --repair too)."""
        ok = sum(1 for o in result.outcomes if o.ok)
        self.set("steps", "Steps of the last run, by result.", ok, result="ok")
        self.set("steps", "Steps of the last run, by result.", len(result.outcomes) - ok, result="failed")
        if self.command == "gc":
            removed = [o for o in result.outcomes if o.ok and o.step.action is Action.REMOVE]
            self.set("removed_versions", "Versions and artifacts the last gc removed.", len(removed))
            self.set("removed_bytes", "Bytes the last gc removed.", sum(o.bytes for o in removed))
            return
        fetches = [o for o in result.outcomes if o.step.action is Action.FETCH]
        self.set("fetched_bytes", "Bytes the last run fetched from sources.", sum(o.moved.fetched for o in fetches))
        self.set("reused_bytes", "Bytes the last run took from files the zoo already held.", sum(o.moved.reused for o in fetches))


def render(rec: Recorder) -> str:
    """The text exposition format: HELP and TYPE once per metric, ``host`` first on every sample."""
    lines = []
    for name, (help_, samples) in rec.samples.items():
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
        for labels, value in samples:
            pairs = ",".join(f'{k}="{escape_label(v)}"' for k, v in {"host": rec.host, **labels}.items())
            lines.append(f"{name}{{{pairs}}} {_number(value)}")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


_LAST_SUCCESS = re.compile(r"^zoo_[a-z]+_last_success_timestamp_seconds\{.*\} ([0-9.e+]+)$", re.MULTILINE)


def _last_success(path: Path) -> float:
    """The previous file's last success, carried over a failed run (0: never)."""
    try:
        found = _LAST_SUCCESS.search(path.read_text())
    except (OSError, UnicodeDecodeError):
        return 0.0
    return float(found.group(1)) if found else 0.0


@contextmanager
def recording(directory: Path | None, command: str, host: str) -> Iterator[Recorder]:
    """Time the command's body and, when a directory is configured, write its file at the end,
    whether the body returned, exited (``sys.exit`` in the CLI) or raised."""
    rec = Recorder(command, host)
    started, wall = time.monotonic(), time.time()
    code = 0
    try:
        yield rec
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise
    except LockHeld:
        directory = None
        raise
    except ZooError as exc:
        code = exc.exit_code
        raise
    except BaseException:
        code = 1
        raise
    finally:
        if directory is not None:
            _finish(rec, directory, code, wall, time.monotonic() - started)


def _finish(rec: Recorder, directory: Path, code: int, wall: float, seconds: float) -> None:
    path = directory / file_name(rec.command)
    what = f"zoo-agent {rec.command}"
    rec.set("last_run_timestamp_seconds", f"When the last {what} started (Unix time).", wall)
    rec.set("last_success_timestamp_seconds", f"When the last successful {what} started (0: never).",
            wall if code == 0 else _last_success(path))
    rec.set("last_run_success", f"1 when the last {what} succeeded.", 1 if code == 0 else 0)
    rec.set("exit_code", f"Exit code of the last {what}.", code)
    rec.set("duration_seconds", f"Seconds the last {what} took.", round(seconds, 3))
    try:
        if rec.artifacts is not None:
            counts = dict.fromkeys(STATES, 0)
            for row in rec.artifacts():
                counts[state_of(row["state"])] += 1
            for state, n in counts.items():
                rec.set("zoo_artifacts", "Artifacts of this host by state, after the last apply.", n, state=state)
        write_atomic(path, render(rec).encode(), _MODE)
    except (OSError, ZooError) as exc:
        log.warning("could not write the textfile-collector file %s: %s", path, exc)
