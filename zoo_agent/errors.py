"""The errors a user can cause, and the exit code each one ends with.

Only ``cli.py`` turns these into an exit status; library code raises. The tree::

    ZooError                 exit 1   root; anything the user can act on
    ├── InvalidIndex         exit 2   index.json is unreadable or breaks the contract
    ├── UsageError           exit 2   a bad flag, an unknown host or id
    │   ├── AdapterError     exit 2   an adapter disagrees with the index, or a request names one not declared
    │   └── SessionError     exit 2   a session id or file a user handed us is not usable
    │       └── SessionDamaged        a session file that holds no valid session (file, pointer, problem)
    ├── SourceError          exit 1   a source could not deliver (missing, unreachable)
    │   └── Transient        exit 1   worth another attempt (5xx, 429, a dropped connection);
    │                                 sources retry it and raise SourceError when they give up
    ├── IntegrityError       exit 1   bytes do not match the sha256/size the index pins
    ├── StoreError           exit 1   the zoo on disk cannot be read or written
    ├── BackendError         exit 1   the serving backend failed a request (an Ollama daemon's HTTP error)
    │   └── OllamaDown       exit 1   the daemon stopped answering: the tenant is unavailable (503) until it answers
    ├── FetchFailed      exit 1+  a tenant fetched on first use could not be (reconcile/ondemand.py; the worst step's code)
    └── LockHeld             exit 75  another run holds the zoo's lock (EX_TEMPFAIL)

Exceptions outside this tree are bugs and keep their tracebacks.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "EXIT_CODES",
    "AdapterError",
    "BackendError",
    "IntegrityError",
    "InvalidIndex",
    "LockHeld",
    "OllamaDown",
    "Problem",
    "SessionDamaged",
    "SessionError",
    "SourceError",
    "Transient",
    "StoreError",
    "UsageError",
    "ZooError",
]

#: The one exit-code table; docs/troubleshooting.md shows the same (tests/unit/test_docs.py checks it).
EXIT_CODES: dict[int, str] = {
    0: "success: the index is valid / the zoo matches the index",
    1: "an operation failed (source, integrity, store); the rest was done where safe",
    2: "bad input: an invalid index, flag, host or id; nothing was changed",
    75: "another zoo-agent run holds the lock; try again or pass --wait",
}


class ZooError(Exception):
    """Root of every error a user can cause; ``str()`` is one line."""

    exit_code: int = 1


@dataclass(frozen=True)
class Problem:
    """One thing wrong in an index, located by a JSON pointer (RFC 6901)."""

    pointer: str
    message: str

    def line(self, file: str) -> str:
        text = f"{file}: {self.pointer}: {self.message}" if self.pointer else f"{file}: {self.message}"
        return text.translate(_ONE_LINE)


# Keys and values come from the user's file; a newline in one must not split the line.
_ONE_LINE = {c: f"\\u{c:04x}" for c in [*range(0x20), 0x7F, 0x85, 0x2028, 0x2029]} | {0x0A: "\\n", 0x09: "\\t"}


class InvalidIndex(ZooError):
    """The index breaks its contract; carries every problem found, not only the first."""

    exit_code = 2

    def __init__(self, file: str, problems: list[Problem]) -> None:
        self.file = file
        self.problems = tuple(problems)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(problems[0].line(file) + more)

    def lines(self) -> list[str]:
        return [p.line(self.file) for p in self.problems]


class UsageError(ZooError):
    exit_code = 2


class AdapterError(UsageError):
    """One line: which adapter, which field, what is wrong. The resident keeps serving the rest."""


class SessionError(UsageError):
    """A session id or file a user handed us is not usable; one line."""


class SessionDamaged(SessionError):
    """A session file that does not hold a session: where, and what is wrong."""

    def __init__(self, file: str, pointer: str, problem: str) -> None:
        self.file, self.pointer, self.problem = file, pointer, problem
        # Keys come from the file: a lone surrogate in one must not break printing the line.
        super().__init__(Problem(pointer, problem).line(file).encode("utf-8", "backslashreplace").decode("utf-8"))


class SourceError(ZooError):
    exit_code = 1


class Transient(SourceError):
    """A failure worth another attempt; one that escapes a retry loop still prints one line."""


class IntegrityError(ZooError):
    """Bytes on disk or on the wire differ from what the index pins."""

    exit_code = 1

    def __init__(self, message: str, *, file: str = "", expected: str = "", actual: str = "") -> None:
        self.file = file
        self.expected = expected
        self.actual = actual
        super().__init__(message)


class StoreError(ZooError):
    exit_code = 1


class BackendError(ZooError):
    """The serving backend failed a request; the request fails, the worker goes on."""


class OllamaDown(BackendError):
    """The daemon stopped answering (or lost the model): the tenant is unavailable, its worker
    answers 503 and asks the daemon again with backoff (``resident/worker/daemon.py``)."""


class LockHeld(ZooError):
    exit_code = 75
