"""The NixOS module, evaluated with the real nixpkgs `lib` (issue #7).

Full nixpkgs cannot be fetched here, so `eval.nix` stands in for the NixOS options the
module sets; everything of ours (types, assertions, units, triggers) is really evaluated.
`.ci/setup` unpacks a nixpkgs `lib` into `.ci/nixpkgs-lib/lib`; `NIXPKGS_LIB` overrides.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO
from tests.support.nix import NIX_LIB, needs_lib, needs_nix
from zoo_agent.systemd.units import HARDENING, RESIDENT_CGROUP, UnitSettings, render

FAKE_AGENT = "/nix/store/00000000000000000000000000000000-zoo-agent-0.1.0/bin/zoo-agent"
FAKE_INDEX = "/nix/store/00000000000000000000000000000000-model-zoo-index"
SHA = "febd1b82a821e2a3ecf7187c7dace15fa986840de0e4310609018aef388f56e3"

SETTINGS = """settings = {
    models.demo = { version = "1"; source = { type = "file"; path = "/srv/models/demo"; };
      files = [ { path = "config.json"; sha256 = "%s"; size = 332; } ]; license = "MIT"; };
    tenants.chat.model = "demo";
    hosts.nixos.resident = "chat";
  };""" % SHA


def evaluate(tmp_path: Path, body: str, other: str = "") -> subprocess.CompletedProcess[str]:
    """*body* inside services.model-zoo; *other*: more of the configuration (other modules' options)."""
    config = tmp_path / "configuration.nix"
    config.write_text("{ services.model-zoo = { enable = true; %s }; %s }\n" % (body, other))
    return subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode", str(REPO / "tests" / "nix" / "eval.nix"),
         "--arg", "nixpkgsLib", str(NIX_LIB), "--arg", "configuration", str(config)],
        capture_output=True, text=True, timeout=120,
    )


def evaluated(tmp_path: Path, body: str, other: str = "") -> dict[str, Any]:
    proc = evaluate(tmp_path, body, other)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def as_unit_values(value: Any) -> list[str]:
    """A NixOS serviceConfig value as the unit file lines systemd would read."""
    if isinstance(value, bool):
        return ["yes" if value else "no"]
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)]


def nixos_service_lines(service: dict[str, Any]) -> dict[str, list[str]]:
    """The [Service] lines NixOS writes for an evaluated service (nixos/lib/systemd-lib.nix):
    serviceConfig values as they are, each environment entry as toJSON "KEY=value"."""
    lines = {k: as_unit_values(v) for k, v in service["serviceConfig"].items() if v != []}
    lines["Environment"] = sorted(json.dumps(f"{k}={v}", ensure_ascii=False) for k, v in service["environment"].items())
    return lines


def service_lines(text: str) -> dict[str, list[str]]:
    """The [Service] lines of a rendered unit, environment sorted as NixOS writes it."""
    lines = parse_unit(text)["Service"]
    lines["Environment"] = sorted(lines["Environment"])
    return lines


def nix_string(value: str) -> str:
    """*value* as a Nix string literal."""
    return json.dumps(value, ensure_ascii=False).replace("$", "\\$")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


@needs_nix
def test_every_nix_file_parses() -> None:
    files = [p for p in REPO.rglob("*.nix") if not {".ci", ".venv"} & set(p.relative_to(REPO).parts)]
    assert {"flake.nix", "modules/model-zoo.nix", "packages/default.nix", "checks/vm.nix"} <= {str(p.relative_to(REPO)) for p in files}
    for path in files:
        proc = subprocess.run(["nix-instantiate", "--parse", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"


@needs_nix
@needs_lib
class TestModule:
    def test_units_types_dependencies_and_triggers(self, tmp_path: Path) -> None:
        out = evaluated(tmp_path, 'indexFile = "/etc/model-zoo/index.json";')
        assert out["failedAssertions"] == []
        reconcile, resident = out["services"]["model-zoo-reconcile"], out["services"]["model-zoo-resident"]
        assert reconcile["serviceConfig"]["Type"] == "oneshot" and reconcile["serviceConfig"]["RemainAfterExit"] is True
        assert reconcile["serviceConfig"]["TimeoutStartSec"] == "infinity"
        assert reconcile["serviceConfig"]["ExecStart"] == f'"{FAKE_AGENT}" "apply"'
        assert "network-online.target" in reconcile["unit"]["after"] and "network-online.target" in reconcile["unit"]["wants"]
        assert resident["serviceConfig"]["Type"] == "notify" and resident["serviceConfig"]["NotifyAccess"] == "main"
        assert resident["serviceConfig"]["WatchdogSec"] == 30
        assert resident["serviceConfig"]["ExecReload"] == f'"{FAKE_AGENT}" "resident" "reload" "--pid" $MAINPID'
        assert "model-zoo-reconcile.service" in resident["unit"]["after"] and "model-zoo-reconcile.service" in resident["unit"]["wants"]
        # An index change re-runs apply but only reloads the resident.
        assert reconcile["unit"]["restartTriggers"] == [FAKE_INDEX] and "restartTriggers" not in resident["unit"]
        assert resident["unit"]["reloadTriggers"] == [FAKE_INDEX]
        assert resident["environment"]["ZOO_INDEX"] == reconcile["environment"]["ZOO_INDEX"] == FAKE_INDEX
        assert resident["environment"]["ZOO_HOST"] == "nixos"  # networking.hostName
        assert out["timers"]["model-zoo-verify"]["timerConfig"]["OnCalendar"] == "weekly"
        assert out["users"]["users"]["model-zoo"]["isSystemUser"] is True
        assert out["users"]["groups"] == {"model-zoo": {}}
        # The index is validated while building, with the file the units read.
        assert out["indexScripts"] == ["zoo-agent validate /etc/model-zoo/index.json\nln -s /etc/model-zoo/index.json $out\n"]

    def test_hardening_is_the_python_block(self, tmp_path: Path) -> None:
        out = evaluated(tmp_path, 'indexFile = "/etc/model-zoo/index.json";')
        for name, service in out["services"].items():
            config = service["serviceConfig"]
            for key, value in HARDENING.items():
                assert as_unit_values(config.get(key)) == as_unit_values(value), (name, key)

    @pytest.mark.parametrize("gpu", ["none", "nvidia", "rocm"])
    def test_units_equal_zoo_agent_systemd_render(self, tmp_path: Path, gpu: str) -> None:
        """`zoo-agent systemd render` and the module give the same [Service] lines."""
        out = evaluated(tmp_path, f'indexFile = "/etc/model-zoo/index.json"; resident.gpu = "{gpu}"; resident.memoryMax = "8G";'
                                  ' huggingFace.tokenFile = "/run/keys/hf"; resident.apiKeyFile = "/run/keys/api"; resident.fleetKeyFile = "/run/keys/fleet";'
                                  ' resident.priorityKeyFile = "/run/keys/priority";'
                                  ' resident.credentials = { openai-key = "/run/keys/openai"; "b.key" = "/run/keys/b"; };'
                                  ' gc.enable = true; ollama.enable = true;')
        rendered = render(UnitSettings(exec_start=(FAKE_AGENT,), index=Path(FAKE_INDEX), host="nixos", gpu=gpu, memory_max="8G",  # type: ignore[arg-type]
                                       hf_token_file=Path("/run/keys/hf"), api_key_file=Path("/run/keys/api"), fleet_key_file=Path("/run/keys/fleet"), priority_key_file=Path("/run/keys/priority"),
                                       credentials={"openai-key": Path("/run/keys/openai"), "b.key": Path("/run/keys/b")},
                                       gc=True, ollama_host="127.0.0.1:11434"))
        assert set(rendered) == {f"{n}.service" for n in out["services"]} | {f"{n}.timer" for n in out["timers"]}
        for name, service in out["services"].items():
            assert service_lines(rendered[f"{name}.service"]) == nixos_service_lines(service), name

    def test_settings_are_typed_and_become_a_valid_index(self, tmp_path: Path) -> None:
        out = evaluated(tmp_path, SETTINGS)
        assert out["failedAssertions"] == []
        (script,) = out["indexScripts"]
        generated = Path(script.split()[2])
        document = json.loads(generated.read_text())
        assert document["hosts"] == {"nixos": {"resident": "chat"}}
        assert document["models"]["demo"]["files"][0]["sha256"] == SHA
        proc = subprocess.run([str(REPO / ".venv" / "bin" / "zoo-agent"), "validate", str(generated)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr

    def test_null_optionals_are_left_out_of_the_index(self, tmp_path: Path) -> None:
        out = evaluated(tmp_path, SETTINGS.replace('hosts.nixos.resident = "chat";', 'hosts.nixos.description = "no resident";'))
        document = json.loads(Path(out["indexScripts"][0].split()[2]).read_text())
        assert document["hosts"] == {"nixos": {"description": "no resident"}}

    def test_a_host_serves_several_tenants_under_a_budget(self, tmp_path: Path) -> None:
        """Issue #20: tenants, memory_budget, pinned, priority and fetch are typed and reach the index as written."""
        body = SETTINGS.replace('tenants.chat.model = "demo";',
                                'tenants.chat = { model = "demo"; pinned = true; priority = "realtime"; };'
                                ' tenants.later = { model = "demo"; fetch = "on-demand"; priority = "batch"; };')
        out = evaluated(tmp_path, body.replace('hosts.nixos.resident = "chat";',
                                               'hosts.nixos = { tenants = [ "chat" "later" ]; memory_budget = "8G"; };'))
        document = json.loads(Path(out["indexScripts"][0].split()[2]).read_text())
        assert document["hosts"] == {"nixos": {"tenants": ["chat", "later"], "memory_budget": "8G"}}
        assert document["tenants"] == {"chat": {"model": "demo", "pinned": True, "priority": "realtime"},
                                       "later": {"model": "demo", "fetch": "on-demand", "priority": "batch"}}
        proc = subprocess.run([str(REPO / ".venv" / "bin" / "zoo-agent"), "validate", str(Path(out["indexScripts"][0].split()[2]))],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr

    def test_federation_fields_are_typed_and_reach_the_index(self, tmp_path: Path) -> None:
        """Issue #22: endpoint, accept_from_peers and overflow reach the index as written, and it validates."""
        body = SETTINGS.replace('tenants.chat.model = "demo";', 'tenants.chat = { model = "demo"; overflow = "never"; };')
        out = evaluated(tmp_path, body.replace('hosts.nixos.resident = "chat";',
                                               'hosts.nixos = { tenants = [ "chat" ]; endpoint = "http://nixos.lan:8000"; accept_from_peers = [ "chat" ]; };'))
        document = json.loads(Path(out["indexScripts"][0].split()[2]).read_text())
        assert document["hosts"] == {"nixos": {"tenants": ["chat"], "endpoint": "http://nixos.lan:8000", "accept_from_peers": ["chat"]}}
        assert document["tenants"] == {"chat": {"model": "demo", "overflow": "never"}}
        proc = subprocess.run([str(REPO / ".venv" / "bin" / "zoo-agent"), "validate", str(Path(out["indexScripts"][0].split()[2]))],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr

    @pytest.mark.parametrize(("change", "expected"), [
        ('hosts.nixos.resident = "chat";', 'hosts.nixos = { resident = "chat"; endpoint = "nixos.lan:8000"; };'),
        ('hosts.nixos.resident = "chat";', 'hosts.nixos = { resident = "chat"; endpoint = "http://nixos.lan:8000/v1"; };'),
        ('hosts.nixos.resident = "chat";', 'hosts.nixos = { resident = "chat"; accept_from_peers = "chat"; };'),
        ('tenants.chat.model = "demo";', 'tenants.chat = { model = "demo"; overflow = "always"; };'),
        ('sha256 = "%s";' % SHA, 'sha256 = "not-a-hash";'),
        ('version = "1";', "version = 1;"),
        ('type = "file";', 'type = "ftp";'),
        ('tenants.chat.model = "demo";', 'tenants.chat.model = "Bad Id";'),
        ('hosts.nixos.resident = "chat";', 'hosts.nixos.tenants = [ "chat" ]; hosts.nixos.memory_budget = "8 GB";'),
        ('hosts.nixos.resident = "chat";', 'hosts.nixos.tenants = "chat";'),
        ('tenants.chat.model = "demo";', 'tenants.chat = { model = "demo"; priority = "urgent"; };'),
        ('tenants.chat.model = "demo";', 'tenants.chat = { model = "demo"; fetch = "lazy"; };'),
        ('tenants.chat.model = "demo";', 'tenants.chat = { model = "demo"; pinned = "yes"; };'),
    ])
    def test_a_bad_settings_value_fails_evaluation_naming_the_option(self, tmp_path: Path, change: str, expected: str) -> None:
        proc = evaluate(tmp_path, SETTINGS.replace(change, expected))
        assert proc.returncode != 0
        assert "services.model-zoo.settings." in proc.stderr and "is not of type" in proc.stderr, proc.stderr

    @pytest.mark.parametrize("body", ["", 'indexFile = "/etc/i.json"; ' + SETTINGS])
    def test_exactly_one_of_index_file_and_settings(self, tmp_path: Path, body: str) -> None:
        out = evaluated(tmp_path, body)
        assert out["failedAssertions"] == ["Set exactly one of services.model-zoo.indexFile and services.model-zoo.settings."]

    def test_secrets_never_reach_the_evaluated_config(self, tmp_path: Path) -> None:
        token, key = secrets.token_hex(16), secrets.token_hex(16)
        (tmp_path / "hf").write_text(token)
        (tmp_path / "api").write_text(key)
        proc = evaluate(tmp_path, f'{SETTINGS} huggingFace.tokenFile = "{tmp_path}/hf"; resident.apiKeyFile = "{tmp_path}/api";')
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        generated = Path(out["indexScripts"][0].split()[2]).read_text()
        for secret in (token, key):
            assert secret not in proc.stdout and secret not in generated
        assert out["services"]["model-zoo-reconcile"]["serviceConfig"]["LoadCredential"] == [f"hf-token:{tmp_path}/hf"]
        assert out["services"]["model-zoo-resident"]["serviceConfig"]["LoadCredential"] == [f"api-key:{tmp_path}/api", f"hf-token:{tmp_path}/hf"]  # on-demand tenants fetch from the resident
        assert "LoadCredential" not in out["services"]["model-zoo-verify"]["serviceConfig"]
        assert out["services"]["model-zoo-resident"]["serviceConfig"]["ExecStart"].endswith("--api-key-file %d/api-key")

    def test_a_remote_tenant_and_its_key_as_a_credential(self, tmp_path: Path) -> None:
        """Issue #36: a tenant with no model (backend "openai") reaches the index and validates; its key is a
        credential the index names, loaded with LoadCredential=, never in the config; our own names are refused."""
        key = secrets.token_hex(16)
        (tmp_path / "openai").write_text(key)
        remote = ('tenants.cloud = { backend = "openai"; remote = { base_url = "https://api.openai.com/v1"; model = "gpt-4o-mini";'
                  ' key_file = "openai-key"; }; };')
        body = SETTINGS.replace('hosts.nixos.resident = "chat";', remote + ' hosts.nixos.tenants = [ "chat" "cloud" ];')
        proc = evaluate(tmp_path, f'{body} resident.credentials.openai-key = "{tmp_path}/openai";')
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert key not in proc.stdout and out["failedAssertions"] == []
        assert out["services"]["model-zoo-resident"]["serviceConfig"]["LoadCredential"] == [f"openai-key:{tmp_path}/openai"]
        generated = Path(out["indexScripts"][0].split()[2])
        assert "model" not in json.loads(generated.read_text())["tenants"]["cloud"]
        validated = subprocess.run([sys.executable, "-m", "zoo_agent", "validate", str(generated)], capture_output=True, text=True)
        assert validated.returncode == 0, validated.stderr
        out = evaluated(tmp_path, f'{SETTINGS} resident.credentials.fleet-key = "{tmp_path}/openai";')
        assert any("services.model-zoo.resident.credentials" in a for a in out["failedAssertions"])
        proc = evaluate(tmp_path, f"{SETTINGS} resident.credentials.openai-key = {tmp_path}/openai;")
        assert proc.returncode != 0 and "services.model-zoo.resident.credentials" in proc.stderr, proc.stderr

    def test_the_priority_key_is_a_credential_never_in_the_config(self, tmp_path: Path) -> None:
        """Issue #31: the privileged key travels like the others; a Nix path (copied to the store) is refused."""
        key = secrets.token_hex(16)
        (tmp_path / "priority").write_text(key)
        proc = evaluate(tmp_path, f'{SETTINGS} resident.priorityKeyFile = "{tmp_path}/priority";')
        assert proc.returncode == 0, proc.stderr
        assert key not in proc.stdout
        config = json.loads(proc.stdout)["services"]["model-zoo-resident"]["serviceConfig"]
        assert config["LoadCredential"] == [f"priority-key:{tmp_path}/priority"] and config["ExecStart"].endswith("--priority-key-file %d/priority-key")
        proc = evaluate(tmp_path, f"{SETTINGS} resident.priorityKeyFile = {tmp_path}/priority;")
        assert proc.returncode != 0 and "services.model-zoo.resident.priorityKeyFile" in proc.stderr, proc.stderr

    def test_a_secret_as_a_nix_path_is_refused(self, tmp_path: Path) -> None:
        """A path literal would be copied into the world-readable store."""
        (tmp_path / "hf").write_text("secret")
        proc = evaluate(tmp_path, f'{SETTINGS} huggingFace.tokenFile = {tmp_path}/hf;')
        assert proc.returncode != 0
        assert "services.model-zoo.huggingFace.tokenFile" in proc.stderr and "not in the Nix store" in proc.stderr, proc.stderr

    def test_gpu_firewall_and_state_dir(self, tmp_path: Path) -> None:
        out = evaluated(tmp_path, SETTINGS + ' resident.gpu = "nvidia"; resident.listen = "0.0.0.0:9000"; openFirewall = true;'
                                             ' stateDir = "/srv/zoo"; verify.interval = null;')
        config = out["services"]["model-zoo-resident"]["serviceConfig"]
        assert config["DeviceAllow"] == ["char-nvidiactl rw", "char-nvidia-caps rw", "char-nvidia-frontend rw", "char-nvidia-uvm rw"]
        assert config["PrivateDevices"] is False and config["DevicePolicy"] == "closed"
        assert out["networking"]["firewall"]["allowedTCPPorts"] == [9000]
        assert config["ReadWritePaths"] == ['"/srv/zoo"', f"-{RESIDENT_CGROUP}"] and "StateDirectory" not in config
        assert config["Delegate"] == "memory"  # one cgroup per worker (issue #34)
        assert out["tmpfiles"]["model-zoo"]["/srv/zoo"]["d"] == {"mode": "0750", "user": "model-zoo", "group": "model-zoo"}
        assert "model-zoo-verify" not in out["services"] and out["timers"] == {}
        assert out["warnings"] == ["services.model-zoo.resident.listen is not loopback and services.model-zoo.resident.apiKeyFile is unset:"
                                   " anyone who can reach it can use the model."]

    def test_an_ollama_daemon_orders_the_units_and_sets_its_address(self, tmp_path: Path) -> None:
        off = evaluated(tmp_path, SETTINGS)  # no services.ollama here: off by default
        assert "OLLAMA_HOST" not in off["services"]["model-zoo-reconcile"]["environment"]
        out = evaluated(tmp_path, SETTINGS + ' ollama.enable = true; ollama.host = "10.0.0.5:11434";')
        for name in ("model-zoo-reconcile", "model-zoo-resident"):
            service = out["services"][name]
            assert service["environment"]["OLLAMA_HOST"] == "10.0.0.5:11434"
            assert "ollama.service" in service["unit"]["after"] and "ollama.service" in service["unit"]["wants"]

    @pytest.mark.parametrize(("option", "definition", "expected"), [
        ("resident.memoryMax", '"8G\nExecStartPre=/bin/sh"', "memory size"),
        ("resident.extraArgs", '[ "--x\nExecStartPre=/bin/sh" ]', "string on one line (no control characters)"),
        ("resident.environment.A", '"b\nExecStartPre=/bin/sh"', "string on one line (no control characters)"),
        ("resident.listen", '"127.0.0.1:8000\nExecStartPre=/bin/sh"', "string on one line (no control characters)"),
        ("huggingFace.endpoint", '"http://hub\nExecStartPre=/bin/sh"', "string on one line (no control characters)"),
        ("huggingFace.tokenFile", '"/run/keys/hf\nExecStartPre=/bin/sh"', "not in the Nix store on one line"),
        ("resident.apiKeyFile", '"/run/keys/api\rExecStartPre=/bin/sh"', "not in the Nix store on one line"),
        ("hostName", '"nixos\nExecStartPre=/bin/sh"', "string on one line (no control characters)"),
        ("user", '"model-zoo\nExecStartPre=/bin/sh"', "user or group name"),
        ("group", '"model zoo"', "user or group name"),
        ("stateDir", '"/srv/zoo\nExecStartPre=/bin/sh"', "absolute path on one line"),
        ("stateDir", '"/srv/it\'s"', "without quotes, backslashes, '%' or ':'"),
        ("ollama.host", '"127.0.0.1:11434\nExecStartPre=/bin/sh"', "string on one line (no control characters)"),
        ("verify.interval", '"weekly\nExecStartPre=/bin/sh"', "string on one line"),
        ("verify.interval", '"weekly\\\\"', "without leading or trailing blanks or a trailing backslash"),
        ("indexFile", '"/etc/model-zoo/index.json\nExecStartPre=/bin/sh"', "path on one line (no control characters)"),
    ])
    def test_a_value_a_unit_cannot_hold_fails_evaluation_naming_the_option(self, tmp_path: Path, option: str, definition: str,
                                                                           expected: str) -> None:
        """A newline would end the directive and inject the next one (issue #17)."""
        body = ("" if option == "indexFile" else 'indexFile = "/etc/model-zoo/index.json"; ') + f"{option} = {definition};"
        proc = evaluate(tmp_path, body + (" ollama.enable = true;" if option.startswith("ollama") else ""))
        assert proc.returncode != 0, proc.stdout
        option_path = "resident.extraArgs" if option == "resident.extraArgs" else option
        assert f"option `services.model-zoo.{option_path}" in proc.stderr and "is not of type" in proc.stderr, proc.stderr
        assert expected in proc.stderr, proc.stderr

    def test_an_environment_name_systemd_would_drop_is_refused(self, tmp_path: Path) -> None:
        out = evaluated(tmp_path, 'indexFile = "/etc/model-zoo/index.json"; resident.environment."A B" = "x";')
        assert out["failedAssertions"] == ["services.model-zoo.resident.environment: \"A B\" is not an environment variable name"
                                           " (letters, digits and '_', not first a digit)."]

    def test_hostile_values_give_the_lines_zoo_agent_systemd_render_gives(self, tmp_path: Path) -> None:
        """Spaces, '%', '$', quotes and backslashes escaped the same way both ways, so the
        systemd checks of the rendered units (tests/integration/test_hostile_units.py) hold
        for the module's units too (issue #17)."""
        hostile = 'a "b" 100% $HOME \\ \'c\' ;'
        values = {"host": f"host {hostile}", "endpoint": f"http://hub/{hostile}", "listen": f"127.0.0.1:8000 {hostile}",
                  "ollama": f"10.0.0.5:11434 {hostile}", "env": hostile,
                  "token": "/run/my keys/hf %n $x", "key": "/run/my keys/api%", "interval": "Mon *-*-* 00:00:00 Europe/Berlin"}
        args = ["--flag", hostile, "%n", "$MAINPID", ";"]
        body = ('indexFile = "/etc/model-zoo/index.json"; stateDir = "/srv/my zoo"; resident.memoryMax = "50%"; ollama.enable = true;'
                f' hostName = {nix_string(values["host"])}; huggingFace.endpoint = {nix_string(values["endpoint"])};'
                f' resident.listen = {nix_string(values["listen"])}; ollama.host = {nix_string(values["ollama"])};'
                f' resident.extraArgs = [ {" ".join(nix_string(a) for a in args)} ];'
                f' resident.environment.EXTRA = {nix_string(values["env"])};'
                f' huggingFace.tokenFile = {nix_string(values["token"])}; resident.apiKeyFile = {nix_string(values["key"])};'
                f' verify.interval = {nix_string(values["interval"])};')
        out = evaluated(tmp_path, body)
        rendered = render(UnitSettings(
            exec_start=(FAKE_AGENT,), index=Path(FAKE_INDEX), root=Path("/srv/my zoo"), host=values["host"], memory_max="50%",
            hf_endpoint=values["endpoint"], listen=values["listen"], ollama_host=values["ollama"], extra_args=tuple(args),
            environment={"EXTRA": values["env"]}, hf_token_file=Path(values["token"]), api_key_file=Path(values["key"]),
            verify_interval=values["interval"]))
        for name, service in out["services"].items():
            ours = service_lines(rendered[f"{name}.service"])
            if name != "model-zoo-resident":  # the module's resident.environment is the resident's only
                ours["Environment"] = [line for line in ours["Environment"] if not line.startswith('"EXTRA=')]
            assert ours == nixos_service_lines(service), name
        assert parse_unit(rendered["model-zoo-verify.timer"])["Timer"]["OnCalendar"] == [out["timers"]["model-zoo-verify"]["timerConfig"]["OnCalendar"]]
        assert out["services"]["model-zoo-resident"]["serviceConfig"]["ReadWritePaths"] == ['"/srv/my zoo"', f"-{RESIDENT_CGROUP}"]

    def test_a_llama_cpp_package_gives_the_lines_zoo_agent_systemd_render_gives(self, tmp_path: Path) -> None:
        """`resident.llamaCpp.package` and `systemd render --llama-server`: the same resident unit, escaped the
        same way whatever its path holds, under the same hardening (issue #33)."""
        store = '/nix/store/00000000000000000000000000000000-llama a "b" 100% $HOME \\ \'c\' ;'
        out = evaluated(tmp_path, 'indexFile = "/etc/model-zoo/index.json"; resident.llamaCpp.enable = true;'
                                  f' resident.llamaCpp.package = {{ type = "derivation"; name = "llama-cpp"; outPath = {nix_string(store)}; }};')
        rendered = render(UnitSettings(exec_start=(FAKE_AGENT,), index=Path(FAKE_INDEX), host="nixos", llama_server=Path(f"{store}/bin/llama-server")))
        for name, service in out["services"].items():
            assert service_lines(rendered[f"{name}.service"]) == nixos_service_lines(service), name
        assert "--llama-server" in out["services"]["model-zoo-resident"]["serviceConfig"]["ExecStart"]
        plain = render(UnitSettings(exec_start=(FAKE_AGENT,), index=Path(FAKE_INDEX), host="nixos"))
        resident, before = parse_unit(rendered.pop("model-zoo-resident.service")), parse_unit(plain.pop("model-zoo-resident.service"))
        assert resident["Service"].pop("ExecStart") != before["Service"].pop("ExecStart")
        assert (resident, rendered) == (before, plain)  # the engine's path is one more argument, nothing else

    def test_prometheus_scrapes_the_resident_and_node_exporter_reads_the_textfiles(self, tmp_path: Path) -> None:
        """Issue #25: a scrape job for the resident, the textfile directory for the oneshot units
        and node_exporter's flag, and the same [Service] lines as `zoo-agent systemd render --textfile-dir`."""
        off = evaluated(tmp_path, SETTINGS)
        assert off["prometheus"] == {"scrapeConfigs": [], "exporters": {"node": {"enable": False, "extraFlags": []}}}
        assert "ZOO_TEXTFILE_DIR" not in off["services"]["model-zoo-reconcile"]["environment"]
        out = evaluated(tmp_path, SETTINGS + ' prometheus.enable = true; resident.listen = "0.0.0.0:9000";'
                                             ' stateDir = "/srv/zoo"; gc.enable = true;')
        assert out["prometheus"]["scrapeConfigs"] == [{"job_name": "model-zoo-resident", "static_configs": [{"targets": ["127.0.0.1:9000"]}]}]
        assert out["prometheus"]["exporters"]["node"]["extraFlags"] == []  # node_exporter is not enabled here
        assert out["tmpfiles"]["model-zoo-metrics"]["/var/lib/model-zoo-metrics"]["d"] == {"mode": "0755", "user": "model-zoo", "group": "model-zoo"}
        rendered = render(UnitSettings(exec_start=(FAKE_AGENT,), index=Path(FAKE_INDEX), root=Path("/srv/zoo"), host="nixos", gc=True,
                                       listen="0.0.0.0:9000", textfile_dir=Path("/var/lib/model-zoo-metrics")))
        for name, service in out["services"].items():
            assert service_lines(rendered[f"{name}.service"]) == nixos_service_lines(service), name
        for name in ("model-zoo-reconcile", "model-zoo-verify"):
            service = out["services"][name]
            assert service["environment"]["ZOO_TEXTFILE_DIR"] == "/var/lib/model-zoo-metrics"
            assert service["serviceConfig"]["ReadWritePaths"] == ['"/srv/zoo"', '"-/var/lib/model-zoo-metrics"']
        assert "ZOO_TEXTFILE_DIR" not in out["services"]["model-zoo-resident"]["environment"]
        node = evaluated(tmp_path, SETTINGS + ' prometheus.enable = true; prometheus.textfileDir = "/run/metrics";',
                         "services.prometheus.exporters.node.enable = true;")
        assert node["prometheus"]["exporters"]["node"]["extraFlags"] == ["--collector.textfile.directory=/run/metrics"]
        assert node["services"]["model-zoo-verify"]["serviceConfig"]["ReadWritePaths"] == ['"-/run/metrics"']  # the zoo itself: StateDirectory=

    def test_prometheus_cannot_scrape_a_unix_socket(self, tmp_path: Path) -> None:
        out = evaluated(tmp_path, SETTINGS + ' prometheus.enable = true; resident.listen = "unix:/run/model-zoo/api.sock";')
        assert out["failedAssertions"] == ["services.model-zoo.prometheus.enable needs services.model-zoo.resident.listen to be address:port:"
                                           " Prometheus cannot scrape a unix socket."]

    @pytest.mark.parametrize("path", ['"/var/lib/my metrics"', '"relative"', '"/x%n"'])
    def test_a_textfile_dir_node_exporter_cannot_take_is_refused(self, tmp_path: Path, path: str) -> None:
        proc = evaluate(tmp_path, f'{SETTINGS} prometheus.enable = true; prometheus.textfileDir = {path};')
        assert proc.returncode != 0
        assert "services.model-zoo.prometheus.textfileDir" in proc.stderr and "is not of type" in proc.stderr, proc.stderr

    def test_the_hf_cache_view_is_exported_after_each_apply_escaped_as_render_does(self, tmp_path: Path) -> None:
        """Issue #35: `hfCache` runs `zoo-agent export hf-cache DIR` after apply and gc, in the
        reconcile unit (its hardening), the directory its one extra writable path, made by
        tmpfiles; '$' and spaces escaped as `zoo-agent systemd render --hf-cache` escapes them."""
        off = evaluated(tmp_path, SETTINGS + " gc.enable = true;")
        assert off["services"]["model-zoo-reconcile"]["serviceConfig"]["ExecStartPost"] == [f'"{FAKE_AGENT}" "gc"']
        assert "model-zoo-hf-cache" not in off["tmpfiles"]
        view = "/srv/hf view $HOME ;"
        out = evaluated(tmp_path, SETTINGS + f" gc.enable = true; hfCache.enable = true; hfCache.directory = {nix_string(view)};"
                                             ' stateDir = "/srv/zoo";')
        assert out["failedAssertions"] == []
        reconcile = out["services"]["model-zoo-reconcile"]["serviceConfig"]
        assert reconcile["ExecStartPost"] == [f'"{FAKE_AGENT}" "gc"', f'"{FAKE_AGENT}" "export" "hf-cache" "/srv/hf view $$HOME ;"']
        assert reconcile["ReadWritePaths"] == ['"/srv/zoo"', '"-/srv/hf view $HOME ;"']
        assert out["services"]["model-zoo-verify"]["serviceConfig"]["ReadWritePaths"] == ['"/srv/zoo"']  # only the reconcile unit writes it
        assert out["tmpfiles"]["model-zoo-hf-cache"] == {view: {"d": {"mode": "0750", "user": "model-zoo", "group": "model-zoo"}}}
        for key, value in HARDENING.items():
            assert as_unit_values(reconcile.get(key)) == as_unit_values(value), key
        rendered = render(UnitSettings(exec_start=(FAKE_AGENT,), index=Path(FAKE_INDEX), root=Path("/srv/zoo"), host="nixos", gc=True,
                                       hf_cache=Path(view)))  # fmt: skip
        for name, service in out["services"].items():
            assert service_lines(rendered[f"{name}.service"]) == nixos_service_lines(service), name
        default = evaluated(tmp_path, SETTINGS + " hfCache.enable = true;")["services"]["model-zoo-reconcile"]["serviceConfig"]
        assert default["ExecStartPost"] == [f'"{FAKE_AGENT}" "export" "hf-cache" "/var/lib/model-zoo-hf-cache"']
        assert default["ReadWritePaths"] == ['"-/var/lib/model-zoo-hf-cache"'] and default["StateDirectory"] == '"model-zoo"'

    @pytest.mark.parametrize(("definition", "expected"), [
        ('hfCache.directory = "/srv/zoo/view";', "overlap"),
        ('hfCache.directory = "/srv";', "overlap"),
        ('hfCache.directory = "/srv/zoo";', "overlap"),
        ('hfCache.directory = "view";', "is not of type"),
        ('hfCache.directory = "/srv/view\nExecStartPre=/bin/sh";', "is not of type"),
        ('hfCache.directory = "/srv/100%";', "is not of type"),
    ])
    def test_an_hf_cache_directory_overlapping_the_zoo_or_no_unit_can_hold_is_refused(self, tmp_path: Path, definition: str,
                                                                                     expected: str) -> None:  # fmt: skip
        proc = evaluate(tmp_path, f'{SETTINGS} stateDir = "/srv/zoo"; hfCache.enable = true; {definition}')
        if expected == "overlap":
            assert proc.returncode == 0, proc.stderr
            (message,) = json.loads(proc.stdout)["failedAssertions"]
            assert message.startswith("services.model-zoo.hfCache.directory (") and "overlap" in message
        else:
            assert proc.returncode != 0 and "services.model-zoo.hfCache.directory" in proc.stderr and expected in proc.stderr, proc.stderr

    def test_open_firewall_with_a_unix_socket_is_refused(self, tmp_path: Path) -> None:
        out = evaluated(tmp_path, SETTINGS + ' resident.listen = "unix:/run/model-zoo/api.sock"; openFirewall = true;')
        assert out["failedAssertions"] == ["services.model-zoo.openFirewall needs services.model-zoo.resident.listen to be address:port, not a unix socket."]


@needs_nix
@needs_lib
def test_flake_outputs_and_package_dependencies_match_pyproject() -> None:
    import tomllib

    proc = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", str(REPO / "tests" / "nix" / "flake-eval.nix"),
                           "--arg", "nixpkgsLib", str(NIX_LIB)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["inputs"] == ["nixpkgs"]
    assert out["outputs"] == ["checks", "devShells", "formatter", "nixosModules", "overlays", "packages"]
    assert out["overlayAttrs"] == ["zoo-agent"] and out["moduleImports"] == [str(REPO / "modules" / "model-zoo.nix")]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["resident"]]
    names = {re.split(r"[<>=!~ \[]", spec)[0].lower().replace("_", "-") for spec in wanted}
    assert set(out["package"]["dependencies"]) == names
    assert out["package"]["version"] == project["version"] and out["package"]["mainProgram"] == "zoo-agent"
