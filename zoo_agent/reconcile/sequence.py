"""The apply sequence, written once (issue #32): what ``zoo-agent apply`` and the resident's fetch
on first use both do under the zoo's lock before the first step is taken.

Leftovers of a killed run swept, the zoo observed, the plan made, conflicts refused, the fit of
the host's tenants proven and the host's identity set: a plan that cannot be carried out safely
changes nothing on disk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from zoo_agent.index.model import Index
from zoo_agent.plan import Desired, Observed, Plan, plan
from zoo_agent.reconcile.apply import refuse_conflicts
from zoo_agent.reconcile.footprints import proven_fits
from zoo_agent.reconcile.observe import observe
from zoo_agent.sources import FetchSettings
from zoo_agent.store.durable import sweep_temps
from zoo_agent.store.host import init_identity
from zoo_agent.store.zoo import Zoo

__all__ = ["planned"]


@contextmanager
def planned(zoo: Zoo, idx: Index, host: str, desired: Desired, index: Path, settings: FetchSettings, tenants: Iterable[str],
            wait: float, make_plan: Callable[[Desired, Observed], Plan] = plan) -> Iterator[Plan]:  # fmt: skip
    """The plan to carry out, while the zoo's lock is held (waited for up to ``wait`` seconds)."""
    with zoo.lock(wait):
        sweep_temps(zoo.host_dir)  # host state a killed run was writing (#17: no orphans)
        zoo.sweep_versions()  # and manifests it was refreshing (#23)
        observed = observe(zoo)
        the_plan = make_plan(desired, observed)
        refuse_conflicts(the_plan, str(index))
        # Before the first step: a host whose tenants cannot fit changes nothing (issue #20).
        proven_fits(idx, host, zoo, observed, index, settings, tuple(tenants))
        init_identity(zoo, desired.host)  # a fresh host gets its identity; an existing one is kept
        yield the_plan
