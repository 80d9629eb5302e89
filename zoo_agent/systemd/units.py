"""systemd units for hosts without NixOS: the same units `modules/model-zoo.nix` declares.

Pure: settings in, unit texts out, so tests compare them with the module's evaluated
units and systemd's own parser; ``systemd.install`` is the one place that writes them.
A test checks that the hardening below and the module's agree key by key (issue #7).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from zoo_agent._version import __version__
from zoo_agent.index.model import CREDENTIAL_PATTERN, OWN_CREDENTIALS

__all__ = ["HARDENING", "UNIT_NAMES", "UnitSettings", "default_exec", "hidden_by_sandbox", "render", "sysusers", "unit_value"]

UNIT_NAMES = ("model-zoo-reconcile.service", "model-zoo-resident.service", "model-zoo-verify.service", "model-zoo-verify.timer")

# One flat block shared by every unit; the module's `hardening` attrset mirrors it.
# Each relaxation (a setting left off or weaker than the strictest) says why.
HARDENING: dict[str, str | list[str]] = {
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateMounts": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    # AF_INET/AF_INET6: fetching from the hub and serving the API; AF_UNIX: sd_notify and
    # the supervisor's control sockets. No AF_NETLINK: nothing here enumerates interfaces.
    "RestrictAddressFamilies": ["AF_UNIX", "AF_INET", "AF_INET6"],
    # No ~@resources: torch's OpenMP threads call sched_setaffinity and oneDNN mbind.
    # Two lines: an allow list, then a deny list ('~' applies to a whole line).
    "SystemCallFilter": ["@system-service", "~@privileged"],
    "SystemCallErrorNumber": "EPERM",
    "SystemCallArchitectures": "native",
    "DevicePolicy": "closed",
    "UMask": "0027",
    "LockPersonality": "yes",
    "ProtectClock": "yes",
    "ProtectControlGroups": "yes",
    "ProtectHostname": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectProc": "invisible",
    # Not "pid": the resident reads /proc/meminfo to decide whether two versions fit during a
    # reload (issue #18); "invisible" above still hides other users' processes.
    "ProcSubset": "all",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "RemoveIPC": "yes",
    "KeyringMode": "private",
    # MemoryDenyWriteExecute is set only on the reconcile and verify units: the resident
    # loads torch, whose oneDNN kernels are generated at run time into executable memory.
    # PrivateDevices and PrivateUsers are set per unit: a GPU needs /dev/nvidia* or
    # /dev/kfd and the host's video/render groups, which a private user namespace unmaps.
}

GPU_DEVICES: dict[str, tuple[str, ...]] = {
    "nvidia": ("char-nvidiactl", "char-nvidia-caps", "char-nvidia-frontend", "char-nvidia-uvm"),
    "rocm": ("char-drm", "char-fb", "char-kfd"),
}
GPU_GROUPS: dict[str, tuple[str, ...]] = {"nvidia": (), "rocm": ("render", "video")}

# What ProtectHome= and PrivateTmp= hide from the services: an interpreter, a venv or an
# index there cannot even be read by them.
_HIDDEN = (Path("/root"), Path("/home"), Path("/run/user"), Path("/tmp"), Path("/var/tmp"))


# How a value enters a unit; see unit_value().
How = Literal["program", "arg", "quoted", "raw", "verbatim"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# systemd's strict user/group names (sysusers.d creates them): no quoting is possible in User=.
_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,30}")
# What systemd accepts as an environment variable name (anything else it drops with a warning).
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CREDENTIAL = re.compile(CREDENTIAL_PATTERN)
# MemoryMax=: bytes with a base-1024 suffix, a percentage of RAM, or infinity.
_MEMORY = re.compile(r"[0-9]+(\.[0-9]+)?[KMGTPE]?|[0-9]+(\.[0-9]+)?%|infinity")


def unit_problem(value: str, how: How) -> str | None:
    """Why *value* cannot be written as *how* so that systemd reads back exactly it, or None."""
    if found := _CONTROL.search(value):
        return f"control character U+{ord(found.group()):04X} in the value; a unit file cannot hold it"
    if _SURROGATE.search(value):
        return "not valid UTF-8; a unit file cannot hold it"
    if how == "program":
        if not value.startswith("/"):
            return f"the program must be an absolute path: {value!r}"
        if "$" in value:
            return f"'$' in the program path (systemd substitutes variables in argv[0] but not in the path it runs): {value!r}"
        if any(c in value for c in "\"'\\"):
            return f"a quote or backslash in the program path, which systemd refuses to run: {value!r}"
    if how in ("raw", "verbatim"):
        if value != value.strip():
            return f"leading or trailing whitespace, which systemd strips: {value!r}"
        if value.endswith("\\"):
            return f"a trailing backslash, which systemd reads as a line continuation: {value!r}"
    return None


def unit_value(value: str, how: How) -> str:
    """*value* written so that systemd reads back exactly *value*: the one escaping rule (issue #17).

    systemd.syntax(7), systemd.service(5), systemd.unit(5) "Specifiers": a line break ends
    a directive, so no control character can be written at all. Wherever systemd expands
    specifiers (every directive we write but MemoryMax=, where '%' is a percentage), '%'
    is doubled. Where systemd splits words (command lines, Environment=, path lists,
    StateDirectory=, sysusers.d) the value is one "..." word with '\\' and '"' escaped, as
    systemd's own unit_concat_strv() writes them (and nixpkgs' escapeSystemdExecArg). In
    command arguments ("arg") '$' is doubled so that no variable is substituted; the
    program path ("program") is never substituted, so it may hold no '$' (nor a quote or a
    backslash: systemd refuses to run such a path). Unquoted values ("raw": '%' doubled,
    "verbatim": as is) must not start or end with whitespace nor end with a backslash:
    systemd would strip the one and join the next line for the other.
    """
    if problem := unit_problem(value, how):
        raise ValueError(problem)
    if how == "verbatim":
        return value
    text = value.replace("%", "%%")
    if how == "raw":
        return text
    text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text.replace("$", "$$") if how == "arg" else text


class UnitSettings(BaseModel):
    """Everything the units are parameterised by; the module's options, under other names.

    Every value is checked here against the directive it ends up in, so a value a unit
    cannot hold is refused before anything is written (issue #17).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    exec_start: tuple[str, ...] = Field(description="The command that runs zoo-agent, as argv.")
    index: Path
    root: Path = Path("/var/lib/model-zoo")
    host: str | None = None
    user: str = "model-zoo"
    group: str = "model-zoo"
    hf_endpoint: str | None = None
    hf_token_file: Path | None = None
    offline: bool = False
    resident: bool = True
    listen: str = "127.0.0.1:8000"
    api_key_file: Path | None = None
    fleet_key_file: Path | None = None  # the key peers present and are presented (issue #22)
    priority_key_file: Path | None = None  # a client key that may also ask for classes above default (issue #31)
    # More credentials of the resident, by name: a remote tenant's key (its index key_file names one, issue #36).
    credentials: dict[str, Path] = Field(default_factory=dict)
    watchdog_sec: int = Field(default=30, ge=0)
    memory_max: str | None = None
    environment: dict[str, str] = Field(default_factory=dict)
    extra_args: tuple[str, ...] = ()
    gpu: Literal["none", "nvidia", "rocm"] = "none"
    verify_interval: str | None = "weekly"
    gc: bool = False
    ollama_host: str | None = None  # OLLAMA_HOST; the units then start after ollama.service
    textfile_dir: Path | None = None  # node_exporter's textfile directory: apply, verify and gc write *.prom there (issue #25)
    hf_cache: Path | None = None  # `zoo-agent export hf-cache` here after every apply (issue #35)
    llama_server: Path | None = None  # `resident --llama-server`, for tenants with backend "llama.cpp" (issue #33)

    @field_validator("*", mode="before")
    @classmethod
    def _fits_a_line(cls, value: Any) -> Any:
        for text in _strings(value):
            if problem := unit_problem(text, "quoted"):
                raise ValueError(problem)
        return value

    @field_validator("index", "root", "hf_token_file", "api_key_file", "fleet_key_file", "priority_key_file", "textfile_dir", "hf_cache",
                     "llama_server")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError(f"must be an absolute path (a unit has no working directory of ours): {value}")
        return value

    @field_validator("credentials")
    @classmethod
    def _credentials(cls, value: dict[str, Path]) -> dict[str, Path]:
        for name, path in value.items():
            if not _CREDENTIAL.fullmatch(name):
                raise ValueError(f"{name!r} is not a credential name (letters, digits, '.', '_' and '-', at most 64, a letter or digit first)")
            if name in OWN_CREDENTIALS:
                raise ValueError(f"{name!r} is a credential of the resident's own; name a remote tenant's key otherwise")
            if not path.is_absolute():
                raise ValueError(f"{name}: must be an absolute path (a unit has no working directory of ours): {path}")
            if problem := unit_problem(str(path), "raw"):  # LoadCredential= takes the rest of its line: no quoting
                raise ValueError(f"{name}: {problem}")
        return value

    @field_validator("root")
    @classmethod
    def _home(cls, value: Path) -> Path:
        if ":" in str(value):
            raise ValueError(f"':' cannot be in the zoo user's home directory (a passwd field): {value}")
        return value

    @field_validator("hf_cache")
    @classmethod
    def _beside_the_zoo(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        root = info.data.get("root")
        if value is not None and root is not None and (value.is_relative_to(root) or root.is_relative_to(value)):
            raise ValueError(f"{value} and the zoo at {root} overlap: the view lives outside the zoo and only links into it")
        return value

    @field_validator("user", "group")
    @classmethod
    def _name(cls, value: str, info: ValidationInfo) -> str:
        if not _USER_NAME.fullmatch(value):
            raise ValueError(f"not a {info.field_name} name systemd accepts (letters, digits, '_' and '-', at most 31): {value!r}")
        return value

    @field_validator("memory_max")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is not None and not _MEMORY.fullmatch(value):
            raise ValueError(f"expected bytes with an optional K/M/G/T/P/E suffix, a percentage or 'infinity': {value!r}")
        return value

    @field_validator("environment")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _ENV_NAME.fullmatch(key):
                raise ValueError(f"not an environment variable name (letters, digits and '_', not first a digit): {key!r}")
        return value

    @field_validator("exec_start")
    @classmethod
    def _program(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("no command given")
        if problem := unit_problem(value[0], "program"):
            raise ValueError(problem)
        return value

    @field_validator("hf_token_file", "api_key_file", "fleet_key_file", "priority_key_file", "verify_interval")
    @classmethod
    def _unquoted(cls, value: Path | str | None) -> Path | str | None:
        # LoadCredential= takes the rest of its line as the path and OnCalendar= the whole
        # line: neither can be quoted.
        if value is not None and (problem := unit_problem(str(value), "raw")):
            raise ValueError(problem)
        return value


def _strings(value: Any) -> list[str]:
    if isinstance(value, (str, Path)):
        return [str(value)]
    if isinstance(value, dict):
        return [text for k, v in value.items() for text in (*_strings(k), *_strings(v))]
    if isinstance(value, (list, tuple)):
        return [text for v in value for text in _strings(v)]
    return []


def default_exec() -> tuple[str, ...]:
    """The zoo-agent of this very installation, so the units run what was just tested."""
    script = Path(sys.executable).parent / "zoo-agent"
    return (str(script),) if script.exists() else (sys.executable, "-m", "zoo_agent")


def hidden_by_sandbox(settings: UnitSettings) -> list[str]:
    """Paths the units need that ProtectHome=/PrivateTmp= would hide from them."""
    needed = [("ExecStart", Path(settings.exec_start[0])), ("index", settings.index), ("root", settings.root)]
    needed += [(name, p) for name, p in (("hf token file", settings.hf_token_file), ("api key file", settings.api_key_file),
                                         ("fleet key file", settings.fleet_key_file), ("priority key file", settings.priority_key_file),
                                         ("textfile dir", settings.textfile_dir), ("hf cache", settings.hf_cache),
                                         ("llama-server", settings.llama_server)) if p]  # fmt: skip
    return [f"{name} {path} is under {hidden} (hidden from the service by the unit's sandbox)"
            for name, path in needed for hidden in _HIDDEN if path.is_relative_to(hidden)]


def render(settings: UnitSettings) -> dict[str, str]:
    """Unit file name -> text. Pure: the same settings always give the same bytes."""
    units = {"model-zoo-reconcile.service": _reconcile_unit(settings)}
    if settings.resident:
        units["model-zoo-resident.service"] = _resident_unit(settings)
    if settings.verify_interval:
        units.update(_verify_units(settings, settings.verify_interval))
    return units


def _reconcile_unit(settings: UnitSettings) -> str:
    ollama = " ollama.service" if settings.ollama_host else ""
    return _unit(
        unit={"Description": "model zoo: fetch, verify and publish this host's models",
              "Wants": "network-online.target" + ollama, "After": "network-online.target" + ollama,
              # A network failure at boot is retried, boundedly, instead of leaving the zoo
              # empty until the next switch.
              "StartLimitIntervalSec": "600", "StartLimitBurst": "5"},
        service={"Type": "oneshot", "RemainAfterExit": "yes",
                 # A long download must never time out; it is the only job of this unit,
                 # so the server's start is not held hostage by it (nixpkgs #334903).
                 "TimeoutStartSec": "infinity",
                 # Lets `zoo-agent apply` report its progress as the unit's Status: line.
                 "NotifyAccess": "main",
                 "ExecStart": _exec(settings, "apply"),
                 "Restart": "on-failure", "RestartSec": "30",
                 **_after_apply(settings),
                 # This unit and the resident (a tenant with fetch "on-demand" is fetched by its first request) get the token; verify does not.
                 **({"LoadCredential": _credential("hf-token", settings.hf_token_file)} if settings.hf_token_file else {}),
                 **_with_hf_cache(settings, _common(settings, textfile=True)),
                 "MemoryDenyWriteExecute": "yes", "PrivateDevices": "yes", "PrivateUsers": "yes"},
        install={"WantedBy": "multi-user.target"})


def _resident_unit(settings: UnitSettings) -> str:
    ollama = " ollama.service" if settings.ollama_host else ""
    return _unit(
        unit={"Description": "model zoo: resident inference server",
              "Wants": "network-online.target model-zoo-reconcile.service" + ollama,
              "After": "network-online.target model-zoo-reconcile.service" + ollama,
              # Bounded backoff: five failed starts in five minutes and the unit stays
              # failed with the resident's own Status: line saying why.
              "StartLimitIntervalSec": "300", "StartLimitBurst": "5"},
        service={"Type": "notify", "NotifyAccess": "main",
                 # The engine runs as the resident's child: in this unit, under its hardening (as the module's llamaCpp.package).
                 "ExecStart": _exec(settings, "resident", *(("--llama-server", str(settings.llama_server)) if settings.llama_server else ()),
                                    *settings.extra_args) + (" --api-key-file %d/api-key" if settings.api_key_file else "")
                              + (" --fleet-key-file %d/fleet-key" if settings.fleet_key_file else "")
                              + (" --priority-key-file %d/priority-key" if settings.priority_key_file else ""),
                 # Synchronous: returns when the new version serves (systemd 252 has no notify-reload).
                 "ExecReload": _exec(settings, "resident", "reload", "--pid") + " $MAINPID",
                 "Restart": "on-failure", "RestartSec": "5",
                 # Short: loading a large model extends it with EXTEND_TIMEOUT_USEC as it goes.
                 "TimeoutStartSec": "90", "TimeoutStopSec": "60",
                 **({"WatchdogSec": str(settings.watchdog_sec)} if settings.watchdog_sec else {}),
                 "RuntimeDirectory": "model-zoo", "RuntimeDirectoryMode": "0750",
                 **({"MemoryMax": unit_value(settings.memory_max, "verbatim")} if settings.memory_max else {}),
                 **_delegated(_common(settings, {"ZOO_LISTEN": settings.listen})),
                 **({"LoadCredential": [_credential(name, path) for name, path in (("api-key", settings.api_key_file), ("fleet-key", settings.fleet_key_file),
                                                                                   ("priority-key", settings.priority_key_file),
                                                                                   ("hf-token", settings.hf_token_file), *sorted(settings.credentials.items()))
                                        if path is not None]}
                    if settings.api_key_file or settings.fleet_key_file or settings.priority_key_file or settings.hf_token_file
                    or settings.credentials else {}),
                 **_devices(settings)},
        install={"WantedBy": "multi-user.target"})


def _verify_units(settings: UnitSettings, interval: str) -> dict[str, str]:
    return {
        "model-zoo-verify.service": _unit(
            unit={"Description": "model zoo: re-hash every published file against its manifest",
                  "After": "model-zoo-reconcile.service"},
            service={"Type": "oneshot", "ExecStart": _exec(settings, "verify"),
                     **_common(settings, textfile=True), "MemoryDenyWriteExecute": "yes", "PrivateDevices": "yes", "PrivateUsers": "yes",
                     # Re-hashing a zoo is bulk I/O; let serving win.
                     "Nice": "10", "IOSchedulingClass": "idle"},
            install={}),
        "model-zoo-verify.timer": _unit(
            unit={"Description": "model zoo: periodic verification"},
            service=None,
            install={"WantedBy": "timers.target"},
            timer={"OnCalendar": unit_value(interval, "raw"), "Persistent": "yes", "RandomizedDelaySec": "1h"}),
    }


def sysusers(settings: UnitSettings) -> str:
    """A sysusers.d entry: a static system user and group, so others can join the group to read the zoo."""
    return (f"# Generated by zoo-agent {__version__}\n"
            f"g {unit_value(settings.group, 'raw')} -\n"
            f"u {unit_value(settings.user, 'raw')} -:{unit_value(settings.group, 'raw')} \"model zoo\" "
            f"{unit_value(str(settings.root), 'quoted')} /usr/sbin/nologin\n")


def _exec(settings: UnitSettings, *args: str) -> str:
    program, *rest = [*settings.exec_start, *args]
    return " ".join([unit_value(program, "program"), *(unit_value(arg, "arg") for arg in rest)])


def _after_apply(settings: UnitSettings) -> dict[str, str | list[str]]:
    """ExecStartPost= of the reconcile unit: gc, then the HF-cache view of what gc left (issue #35)."""
    commands = [_exec(settings, *args) for args, wanted in ((("gc",), settings.gc),
                (("export", "hf-cache", str(settings.hf_cache)), settings.hf_cache is not None)) if wanted]  # fmt: skip
    if not commands:
        return {}
    return {"ExecStartPost": commands[0] if len(commands) == 1 else commands}


#: The resident's own cgroup (cgroup v2, the system instance's default slice): ProtectControlGroups=
#: leaves the rest of /sys/fs/cgroup read-only; '-': a host without it starts anyway (issue #34).
RESIDENT_CGROUP = "/sys/fs/cgroup/system.slice/model-zoo-resident.service"


def _delegated(common: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
    """One cgroup per worker, with a memory limit (issue #34): the unit's cgroup is the resident's to divide
    (Delegate=memory; the memory controller only), writable though the rest of the hierarchy stays read-only."""
    paths = common.get("ReadWritePaths", [])
    return {**common, "Delegate": "memory", "ReadWritePaths": [*(paths if isinstance(paths, list) else [paths]), f"-{RESIDENT_CGROUP}"]}


def _with_hf_cache(settings: UnitSettings, common: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
    """The view's directory, writable besides the zoo ('-': a missing one fails the export, saying so, not the namespace)."""
    if settings.hf_cache is None:
        return common
    paths = common.get("ReadWritePaths", [])
    return {**common, "ReadWritePaths": [*(paths if isinstance(paths, list) else [paths]), unit_value(f"-{settings.hf_cache}", "quoted")]}


def _credential(name: str, path: Path) -> str:
    # LoadCredential=ID:PATH takes the rest of the line as the path: no quoting there.
    return f"{name}:{unit_value(str(path), 'raw')}"


def _common(settings: UnitSettings, extra_env: dict[str, str] | None = None, textfile: bool = False) -> dict[str, str | list[str]]:
    metrics = settings.textfile_dir if textfile else None  # only the oneshot units write textfiles
    env = {"ZOO_ROOT": str(settings.root), "ZOO_INDEX": str(settings.index),
           **({"ZOO_TEXTFILE_DIR": str(metrics)} if metrics else {}),
           **({"ZOO_HOST": settings.host} if settings.host else {}),
           **({"HF_ENDPOINT": settings.hf_endpoint} if settings.hf_endpoint else {}),
           **({"HF_HUB_OFFLINE": "1"} if settings.offline else {}),
           **({"OLLAMA_HOST": settings.ollama_host} if settings.ollama_host else {}),
           # Plain log lines for the journal (no progress bars, no colour).
           "PYTHONUNBUFFERED": "1",
           **(extra_env or {}), **settings.environment}
    state: dict[str, str | list[str]]
    if settings.root.parent == Path("/var/lib"):
        state = {"StateDirectory": unit_value(settings.root.name, "quoted"), "StateDirectoryMode": "0750"}
    else:  # `install` creates it; StateDirectory= only manages /var/lib.
        state = {"ReadWritePaths": [unit_value(str(settings.root), "quoted")]}
    if metrics:
        # '-': a missing directory does not keep the unit from starting; apply logs that it
        # could not write its metrics there and goes on.
        state["ReadWritePaths"] = [*state.get("ReadWritePaths", []), unit_value(f"-{metrics}", "quoted")]
    return {"User": unit_value(settings.user, "raw"), "Group": unit_value(settings.group, "raw"), **state,
            # One "KEY=value" word each, as NixOS writes them; '$' is not substituted here.
            "Environment": [unit_value(f"{k}={v}", "quoted") for k, v in env.items()],
            **HARDENING}


def _devices(settings: UnitSettings) -> dict[str, str | list[str]]:
    if settings.gpu == "none":
        return {"PrivateDevices": "yes", "PrivateUsers": "yes"}
    out: dict[str, str | list[str]] = {"PrivateDevices": "no", "PrivateUsers": "no",
                                       "DeviceAllow": [f"{dev} rw" for dev in GPU_DEVICES[settings.gpu]]}
    if GPU_GROUPS[settings.gpu]:
        out["SupplementaryGroups"] = list(GPU_GROUPS[settings.gpu])
    return out


def _unit(*, unit: dict[str, str], service: dict[str, str | list[str]] | None, install: dict[str, str],
          timer: dict[str, str] | None = None) -> str:
    lines = [f"# Generated by zoo-agent {__version__} (`zoo-agent systemd render`); modules/model-zoo.nix declares the same."]
    for section, values in (("Unit", unit), ("Service", service), ("Timer", timer), ("Install", install)):
        if not values:
            continue
        lines += ["", f"[{section}]"]
        for key, value in values.items():
            for item in value if isinstance(value, list) else [value]:
                lines.append(f"{key}={item}")
    return "\n".join(lines) + "\n"
