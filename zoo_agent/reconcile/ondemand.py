"""Fetch on first use: ``apply`` for one tenant, called in-process by the resident (issue #20).

The same verified fetch as ``zoo-agent apply --tenant``: the index loaded and validated
(the resident passes the one it serves from: the file may have moved on since),
the tenant checked against what the index declares for the host (an undeclared one is
never fetched), the zoo's lock (waited for, so a running ``apply`` delays a first request
instead of failing it), the fit proven, then staging, sha256 checks and the atomic
switch. Killed midway, the next call resumes the staged bytes and converges.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from zoo_agent.errors import ZooError
from zoo_agent.index.load import load_index
from zoo_agent.index.model import Index
from zoo_agent.plan import Action, Plan, desired_for_tenant, host_id
from zoo_agent.reconcile.apply import Result, apply
from zoo_agent.reconcile.progress import Progress
from zoo_agent.reconcile.sequence import planned
from zoo_agent.sources import FetchSettings
from zoo_agent.store.zoo import Zoo
from zoo_agent.systemd.notify import Notifier

__all__ = ["FetchFailed", "fetch_tenant", "pins"]

Report = Callable[[int, int], None]


class FetchFailed(ZooError):
    """A step of the tenant's fetch failed (source, integrity, store); its exit code is the worst step's."""

    def __init__(self, tenant: str, result: Result) -> None:
        failures = result.failures
        self.tenant = tenant
        self.exit_code = result.exit_code
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        super().__init__(" ".join(f"tenant {tenant}: {failures[0].error}{more}".split()))


class _Reported(Progress):
    """Progress as (done_bytes, total_bytes) calls, and never a word to systemd: in the
    resident the supervisor is the only voice there."""

    def __init__(self, total: int, report: Report | None) -> None:
        super().__init__(total)
        self.notifier = Notifier("")
        self.report = report
        self._tell()

    def item(self, label: str, size: int) -> Callable[[int], None]:
        advance = super().item(label, size)

        def counted(n: int) -> None:
            advance(n)
            self._tell()

        return counted

    def _tell(self) -> None:
        if self.report is not None:
            self.report(min(self.done, self.total), self.total)

    def finish(self) -> None:
        """All there: reused and resumed bytes were never counted as they arrived."""
        self.done = self.total
        self._tell()


def _fetch_bytes(the_plan: Plan) -> int:
    return sum(s.size - s.reused_size for s in the_plan if s.action is Action.FETCH)


def pins(idx: Index, host: str, tenant: str) -> str:
    """Everything a fetch of ``tenant`` makes current (each artifact's id, version and file
    pins), as one string: two indexes that give the same one ask for the same fetch."""
    desired = desired_for_tenant(idx, host_id(idx, host), tenant)
    return "\n".join(f"{w.kind}/{w.id}@{w.version} {w.source!r} {sorted(w.pins())}" for w in desired.wants)


def fetch_tenant(index: Path, root: Path, host: str, tenant: str, progress: Report | None = None,
                 lock_timeout: float = 600.0, idx: Index | None = None) -> None:  # fmt: skip
    """Make ``tenant``'s declared model and adapters current in the zoo at ``root``.

    ``idx``: the index already loaded from ``index`` (the resident's: it fetches exactly what
    it serves, never what the file says since; relative sources still resolve beside ``index``).
    Raises ``InvalidIndex`` (a bad index, or a tenant that cannot fit the host's budget),
    ``UsageError`` (the index does not declare the tenant for ``host``), ``LockHeld``
    (another run held the lock for ``lock_timeout`` seconds), or ``FetchFailed``.
    Writes no applied index and collects no garbage: only a whole ``apply`` does."""
    if idx is None:
        idx = load_index(index, str(index))
    hid = host_id(idx, host)
    desired = desired_for_tenant(idx, hid, tenant)
    zoo = Zoo(root)
    zoo.check_root(create=True)
    settings = FetchSettings.from_environment()
    with planned(zoo, idx, hid, desired, index, settings, (tenant,), lock_timeout) as the_plan:
        reported = _Reported(_fetch_bytes(the_plan), progress)
        result = apply(the_plan, zoo, desired, index.resolve().parent, reported, settings)
    if result.failures:
        raise FetchFailed(tenant, result)
    reported.finish()
