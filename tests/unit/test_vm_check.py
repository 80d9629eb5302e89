"""checks/vm.nix greps the resident's STATUS= line: the pattern must match what the resident
writes now (reports.py ``status_line``), not the old one-tenant ``chat: tiny@1; N requests``
form (issue #31)."""

from __future__ import annotations

import re
import shutil
import subprocess
from types import SimpleNamespace
from typing import Any, cast

import pytest

from tests.support import REPO
from zoo_agent.resident.reports import Reports
from zoo_agent.resident.slots import Slot
from zoo_agent.resident.wire.control import Pong

VM = REPO / "checks" / "vm.nix"


def _status_line(*, running: int = 0, served: int = 0, tps: float = 0.0, live: int = 0) -> str:
    """Reports.status_line for the VM's one tenant (chat, serving tiny@1), over a stand-in slot table."""
    stats = Pong(seq=0, served=served, running=running, tps=tps)  # what the worker reports
    worker = SimpleNamespace(state="serving", stats=stats, config=SimpleNamespace(model="tiny", version="1"), live=live)  # live: measured (issue #34)
    slot = Slot("chat", phase="serving", serving=cast(Any, worker), estimate=4 << 20)  # the real slot: every field status_line reads
    table = SimpleNamespace(order=["chat"], slots={"chat": slot})
    return Reports(cast(Any, table), cast(Any, None), cast(Any, None), lambda: "").status_line()


def _pattern() -> str:
    (found,) = re.findall(r"StatusText --value model-zoo-resident \| grep -Eq '([^']+)'", VM.read_text())
    return found


@pytest.mark.parametrize("line", [_status_line(), _status_line(running=2, served=5, tps=3.5), _status_line(live=3 << 20)])
def test_the_vm_check_matches_the_status_line_the_resident_writes(line: str) -> None:
    assert line.startswith("1 tenant: chat tiny@1 (")
    assert re.search(_pattern(), line), (_pattern(), line)


@pytest.mark.skipif(shutil.which("nix-instantiate") is None, reason="nix-instantiate is not installed")
def test_the_vm_check_parses() -> None:
    proc = subprocess.run(["nix-instantiate", "--parse", str(VM)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
