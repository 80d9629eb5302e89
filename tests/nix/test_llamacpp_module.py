"""The NixOS module with a llama.cpp tenant (issue #33), evaluated with the real nixpkgs `lib`:
`resident.llamaCpp.package` reaches the resident's command line as `--llama-server`, and the
engine, a child of the resident, runs under the same unit and so the same hardening."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.support import REPO
from tests.support.nix import NIX_LIB, needs_lib, needs_nix
from zoo_agent.systemd.units import HARDENING

FAKE_AGENT = "/nix/store/00000000000000000000000000000000-zoo-agent-0.1.0/bin/zoo-agent"
FAKE_LLAMA = "/nix/store/00000000000000000000000000000000-llama-cpp-6981/bin/llama-server"
SHA = "febd1b82a821e2a3ecf7187c7dace15fa986840de0e4310609018aef388f56e3"


def _settings(backend: str | None) -> str:
    tenant = f'tenants.chat = {{ model = "demo";{f" backend = {json.dumps(backend)};" if backend else ""} }};'
    return ("settings = { models.demo = { version = \"1\"; format = \"gguf\"; source = { type = \"file\"; path = \"/srv/models/demo\"; };"
            f' files = [ {{ path = "demo.gguf"; sha256 = "{SHA}"; size = 332; }} ]; license = "MIT"; }}; {tenant} hosts.nixos.resident = "chat"; }};')  # fmt: skip


def _lines(value: Any) -> list[str]:
    """A serviceConfig value as the unit file's lines."""
    if isinstance(value, bool):
        return ["yes" if value else "no"]
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _evaluate(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "configuration.nix"
    config.write_text("{ services.model-zoo = { enable = true; %s }; }\n" % body)
    return subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode", str(REPO / "tests" / "nix" / "eval.nix"),
                           "--arg", "nixpkgsLib", str(NIX_LIB), "--arg", "configuration", str(config)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def _resident(tmp_path: Path, body: str) -> dict[str, Any]:
    proc = _evaluate(tmp_path, body)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    assert out["failedAssertions"] == []
    service: dict[str, Any] = out["services"]["model-zoo-resident"]["serviceConfig"]
    return service


@needs_nix
@needs_lib
def test_a_llama_cpp_tenant_gives_the_resident_llama_server_under_the_same_hardening(tmp_path: Path) -> None:
    plain = _resident(tmp_path, _settings(None))
    llama = _resident(tmp_path, _settings("llama.cpp"))
    assert plain["ExecStart"] == f'"{FAKE_AGENT}" "resident"'
    assert llama["ExecStart"] == f'"{FAKE_AGENT}" "resident" "--llama-server" "{FAKE_LLAMA}"'
    assert {k: v for k, v in llama.items() if k != "ExecStart"} == {k: v for k, v in plain.items() if k != "ExecStart"}
    for key, value in HARDENING.items():
        assert _lines(llama.get(key)) == _lines(value), key
    # Its own package (a GPU build, say), and off with an index file unless asked for.
    other = 'resident.llamaCpp.package = { type = "derivation"; name = "llama-cpp-cuda"; outPath = "/nix/store/x-llama-cpp-cuda"; };'
    assert _resident(tmp_path, _settings("llama.cpp") + " " + other)["ExecStart"].endswith('"--llama-server" "/nix/store/x-llama-cpp-cuda/bin/llama-server"')
    assert _resident(tmp_path, 'indexFile = "/etc/model-zoo/index.json";')["ExecStart"] == f'"{FAKE_AGENT}" "resident"'
    on = _resident(tmp_path, 'indexFile = "/etc/model-zoo/index.json"; resident.llamaCpp.enable = true;')
    assert on["ExecStart"] == f'"{FAKE_AGENT}" "resident" "--llama-server" "{FAKE_LLAMA}"'


@needs_nix
@needs_lib
def test_a_tenants_backend_is_typed(tmp_path: Path) -> None:
    proc = _evaluate(tmp_path, _settings("llamacpp"))
    assert proc.returncode != 0 and "backend" in proc.stderr and "llama.cpp" in proc.stderr, proc.stderr
