"""Where the nixpkgs ``lib`` is, and the skips for a machine without nix or without it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support import REPO


NIX_LIB = Path(os.environ.get("NIXPKGS_LIB") or REPO / ".ci" / "nixpkgs-lib" / "lib")


needs_nix = pytest.mark.skipif(shutil.which("nix-instantiate") is None, reason="nix-instantiate not installed (.ci/setup installs Debian's nix-bin)")


needs_lib = pytest.mark.skipif(not (NIX_LIB / "default.nix").is_file(),
                               reason=f"no nixpkgs lib at {NIX_LIB} (set NIXPKGS_LIB; .ci/setup unpacks one when a nixpkgs.lib checkout is present)")
