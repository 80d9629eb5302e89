"""Fixtures for every test, used by name: a valid index to mutate, and a clean environment.
Helpers and harnesses live in tests/support and are imported from there."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.index import VALID_INDEX


@pytest.fixture
def index_doc() -> dict[str, Any]:
    """A fresh deep copy of a valid index, free to mutate."""
    return copy.deepcopy(VALID_INDEX)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No developer's HF_* / ZOO_* settings leak into a test."""
    import os

    for name in list(os.environ):
        if name.startswith(("HF_", "ZOO_", "HUGGING_FACE_")):
            monkeypatch.delenv(name)
    yield
