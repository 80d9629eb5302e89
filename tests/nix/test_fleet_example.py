"""examples/fleet: three hosts from one flake and one index, as nixos-rebuild, colmena and
deploy-rs get them (issue #22), evaluated offline.

Full nixpkgs cannot be fetched here (no channel is reachable offline), so `fleet-eval.nix` calls the
example's flake with stand-in inputs: nixpkgs' real `lib` whose `nixosSystem` is
`eval.nix` (our module really evaluated, a loose stand-in for the rest of NixOS), colmena's
`makeHive` as the identity, deploy-rs' `activate.nixos` wrapping the configuration. What
this proves: each tool gets the same three hosts, each reconciling its own id of the one
index from the one mirror, with the listener its index endpoint names. What it cannot:
that nixpkgs builds those systems (hardware configuration, CUDA torch).
"""

from __future__ import annotations

import json
import subprocess
from functools import cache
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.support import REPO
from tests.support.nix import NIX_LIB, needs_lib, needs_nix

EXAMPLE = REPO / "examples" / "fleet"
#: Until modules/model-zoo.nix declares it, fleet-eval.nix declares a stand-in for it.
MODULE_HAS_FLEET_KEY = "fleetKeyFile" in (REPO / "modules" / "model-zoo.nix").read_text()

pytestmark = [needs_nix, needs_lib]


@cache
def fleet() -> dict[str, Any]:
    proc = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode", str(REPO / "tests" / "nix" / "fleet-eval.nix"),
         "--arg", "nixpkgsLib", str(NIX_LIB), "--arg", "declareFleetKey", "false" if MODULE_HAS_FLEET_KEY else "true"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def index() -> dict[str, Any]:
    document: dict[str, Any] = json.loads((EXAMPLE / "index.json").read_text())
    return document


def test_one_flake_gives_every_tool_the_index_hosts() -> None:
    out, hosts = fleet(), set(index()["hosts"])
    assert out["inputs"] == ["colmena", "deploy-rs", "model-zoo", "nixpkgs"]
    assert out["outputs"] == ["checks", "colmenaHive", "deploy", "nixosConfigurations"]
    assert set(out["nixos"]) == set(out["colmena"]) == set(out["deploy"]) == hosts
    assert out["checks"] == ["aarch64-linux", "x86_64-linux"]  # deploy-rs' deployChecks per system


@pytest.mark.parametrize("tool", ["nixos", "colmena"])
def test_each_host_reconciles_its_own_id_of_the_one_index_from_the_one_mirror(tool: str) -> None:
    for host, entry in index()["hosts"].items():
        config = fleet()[tool][host]
        assert config["failedAssertions"] == [] and config["warnings"] == [], host
        assert config["hostName"] == host and config["overlays"] == 1, host  # nixosModules.default's overlay
        (script,) = config["indexScripts"]  # validated at build time: this file, the same on every host
        assert script.split()[:3] == ["zoo-agent", "validate", str(EXAMPLE / "index.json")], host
        for unit in ("model-zoo-reconcile", "model-zoo-resident"):
            environment = config["services"][unit]["environment"]
            assert environment["ZOO_HOST"] == host and environment["HF_ENDPOINT"] == "http://mirror.lan:8080", (host, unit)
        listen = config["services"]["model-zoo-resident"]["environment"]["ZOO_LISTEN"]
        assert listen.rsplit(":", 1)[1] == str(urlsplit(entry["endpoint"]).port), host  # peers reach what it listens on
        assert config["networking"]["firewall"]["allowedTCPPorts"] == [8000], host
        assert config["fleetKeyFile"] == "/run/agenix/model-zoo-fleet-key", host


def test_nixos_rebuild_and_colmena_build_the_same_hosts() -> None:
    out = fleet()
    for host, config in out["nixos"].items():
        colmena = out["colmena"][host]
        assert colmena["services"] == config["services"] and colmena["timers"] == config["timers"], host
        assert colmena["nixpkgs"] == config["pkgs"], host  # meta.nodeNixpkgs is nixpkgs.pkgs
        assert colmena["deployment"] == {"targetHost": f"{host}.lan", "tags": ["model-zoo"]}, host


def test_deploy_rs_activates_each_hosts_own_configuration() -> None:
    out = fleet()
    for host, node in out["deploy"].items():
        assert node == {"hostname": out["colmena"][host]["deployment"]["targetHost"], "user": "root",
                        "system": out["nixos"][host]["pkgs"]["system"], "hostName": host}  # fmt: skip


def test_platforms_and_gpus() -> None:
    """The GPU hosts get CUDA torch and the NVIDIA device nodes; the board neither."""
    out = fleet()["nixos"]
    for host in ("thor", "legion"):
        assert out[host]["pkgs"] == {"system": "x86_64-linux", "config": {"allowUnfree": True, "cudaSupport": True}}
        assert "char-nvidia-uvm rw" in out[host]["services"]["model-zoo-resident"]["serviceConfig"]["DeviceAllow"]
    assert out["sprout"]["pkgs"] == {"system": "aarch64-linux", "config": {"allowUnfree": False, "cudaSupport": False}}
    resident = out["sprout"]["services"]["model-zoo-resident"]["serviceConfig"]
    assert resident["DeviceAllow"] == [] and resident["PrivateDevices"] is True and resident["MemoryMax"] == "6G"


@pytest.mark.skipif(not MODULE_HAS_FLEET_KEY, reason="modules/model-zoo.nix does not declare resident.fleetKeyFile yet (issue #22)")
def test_the_fleet_key_reaches_the_resident_as_a_credential() -> None:
    for host, config in fleet()["nixos"].items():
        service = config["services"]["model-zoo-resident"]["serviceConfig"]
        assert "fleet-key:/run/agenix/model-zoo-fleet-key" in service["LoadCredential"], host
        assert "--fleet-key-file %d/fleet-key" in service["ExecStart"], host
