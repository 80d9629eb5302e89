"""The locks in requirements/ are what pyproject.toml asks for (issue #16)."""

from __future__ import annotations

import pytest
from packaging.requirements import Requirement

from tests.support.lockfile import LOCKS, inputs_digest, normalize, pins, requested, stored_digest

FIX = "regenerate the locks: bash .ci/lock"


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_the_lock_was_compiled_from_todays_pyproject(lock: str) -> None:
    assert stored_digest(lock) == inputs_digest(), f"{lock} is stale: pyproject.toml or constraints changed; {FIX}"


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_requested_package_is_pinned_within_its_range(lock: str) -> None:
    pinned = pins(lock)
    for line in requested(LOCKS[lock]):
        req = Requirement(line)
        name = normalize(req.name)
        assert name in pinned, f"{lock}: {req.name} is not pinned; {FIX}"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{lock}: {name}=={pinned[name]} is outside {req}; {FIX}"


def test_the_resident_lock_agrees_with_the_test_lock() -> None:
    """The quick start runs what CI tested: every version they share is the same."""
    resident, test = pins("requirements/resident.txt"), pins("requirements/test.txt")
    assert {n: v for n, v in resident.items() if test.get(n) != v} == {}


def test_torch_is_the_local_cpu_build() -> None:
    """An unpinned torch pulls gigabytes of CUDA packages; the lock must hold the CPU wheel."""
    for lock in LOCKS:
        assert pins(lock)["torch"] == "2.13.0+cpu"
        assert not any(n.startswith("nvidia-") for n in pins(lock))
