"""Harnesses and helpers the tests import (fixtures live in conftest.py and are used by name)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
