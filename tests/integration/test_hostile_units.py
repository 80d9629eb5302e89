"""Nothing escapes the zoo through a unit file (issue #17).

A newline in any value that reaches a unit would end its directive and start another
(`ExecStartPre=/bin/sh …`), so each flag refuses control characters before anything is
written. Spaces, '%', '$', quotes and backslashes are legal, and must mean to systemd
what they meant on the command line: systemd itself reads the rendered units back
(`SYSTEMD_LOG_LEVEL=debug systemd-analyze verify` dumps each unit as it parsed it:
every Environment= entry, each command's argv, ReadWritePaths=, MemoryMax=, OnCalendar=).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from tests.support.victim import make_victim, snapshot
from zoo_agent.cli.main import cli
from zoo_agent.systemd.units import RESIDENT_CGROUP, UnitSettings

REPO = Path(__file__).resolve().parents[2]
AGENT = str(Path(sys.executable).parent / "zoo-agent")
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (Debian: systemd)")
needs_sysusers = pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers not installed (Debian: systemd)")

# Everything a unit could misread, but no control character: words, both quotes, a
# specifier, variables in both spellings, backslashes, a lone ';' and non-ASCII.
HOSTILE = 'two words "quoted" \'single\' 100% %n $HOME ${HOME} \\ back\\slash ; é'
INJECTION = "\nExecStartPre=/bin/sh -c 'touch /tmp/escaped'"

# Every flag whose value reaches a unit, with a legal value to append the injection to.
FLAGS = {
    "--env": "A=b", "--memory-max": "8G", "--extra-arg": "--flag", "--user": "model-zoo", "--group": "model-zoo",
    "--verify-interval": "weekly", "--hf-endpoint": "http://hub.internal", "--listen": "127.0.0.1:8000",
    "--host": "local", "--root": "/srv/zoo", "--hf-token-file": "/run/keys/hf", "--api-key-file": "/run/keys/api",
    "--ollama-host": "127.0.0.1:11434", "--index": "/etc/model-zoo/index.json", "--exec": "/opt/model-zoo/bin/zoo-agent",
    "--llama-server": "/opt/llama.cpp/bin/llama-server",
}


@pytest.fixture
def place() -> Iterator[Path]:
    """A directory the units' sandbox would not hide (see test_units.visible), whose own
    name has spaces and a '%', holding the index and a link to this zoo-agent."""
    if not os.access("/run", os.W_OK):
        pytest.skip("needs a writable /run for paths outside /tmp (run as root)")
    top = Path(tempfile.mkdtemp(prefix="zoo-hostile-", dir="/run"))
    odd = top / "my zoo 100% é"  # systemd refuses quotes and backslashes in an executable's path
    odd.mkdir()
    shutil.copy(REPO / "index.json", odd / "index.json")
    (odd / "zoo-agent").symlink_to(AGENT)
    yield odd
    shutil.rmtree(top)


def install(tmp_path: Path, place: Path, *args: str) -> tuple[int, str, Path]:
    prefix = tmp_path / "units"
    prefix.mkdir(exist_ok=True)
    result = CliRunner().invoke(cli, ["systemd", "install", "--index", str(place / "index.json"), "--exec", shlex.quote(str(place / "zoo-agent")),
                                      "--prefix", str(prefix), "--sysusers-dir", str(tmp_path / "sysusers"), "--no-activate", *args])
    return result.exit_code, result.output, prefix


# -- refused: nothing is written --------------------------------------------------------

# No NUL here: no argv can hold one (see the UnitSettings test below).
@pytest.mark.parametrize("control", ["\n", "\r", "\t", "\x1b", "\x7f"], ids=["LF", "CR", "TAB", "ESC", "DEL"])
@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_a_control_character_is_refused_naming_the_flag_and_nothing_is_written(tmp_path: Path, flag: str, control: str) -> None:
    prefix, sysusers = make_victim(tmp_path / "units"), make_victim(tmp_path / "sysusers")
    before = snapshot(tmp_path)
    value = FLAGS[flag] + INJECTION.replace("\n", control)
    base = {"--index": str(tmp_path / "index.json"), "--exec": AGENT}
    args = [*(a for k, v in base.items() if k != flag for a in (k, v)), flag, shlex.quote(value) if flag == "--exec" else value]
    result = CliRunner().invoke(cli, ["systemd", "install", *args, "--prefix", str(prefix), "--sysusers-dir", str(sysusers), "--no-activate"])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [f"{flag}: control character U+{ord(control):04X} in the value; a unit file cannot hold it"]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("field", ["exec_start", "index", "root", "host", "user", "group", "hf_endpoint", "hf_token_file", "listen",
                                   "api_key_file", "memory_max", "environment", "extra_args", "verify_interval", "ollama_host",
                                   "llama_server"])
def test_settings_refuse_a_nul_in_any_field(field: str) -> None:
    """What the CLI builds, and what any other caller of render() builds."""
    legal: dict[str, object] = {"exec_start": ("/opt/zoo-agent",), "index": Path("/etc/i.json")}
    value = {"exec_start": ("/opt/zoo-agent", "a\x00b"), "index": Path("/etc/i\x00.json"), "root": Path("/srv/\x00"),
             "hf_token_file": Path("/run/k\x00"), "api_key_file": Path("/run/k\x00"), "environment": {"A": "\x00"},
             "llama_server": Path("/opt/llama\x00"),
             "extra_args": ("\x00",)}.get(field, "x\x00")
    with pytest.raises(ValidationError, match="control character U\\+0000 in the value; a unit file cannot hold it"):
        UnitSettings(**{**legal, field: value})


@pytest.mark.parametrize("flag", ["--env", "--memory-max", "--extra-arg", "--user", "--verify-interval", "--hf-endpoint", "--listen",
                                  "--host", "--root", "--hf-token-file", "--ollama-host", "--llama-server"])
def test_render_refuses_an_injection_and_prints_no_unit(flag: str) -> None:
    result = CliRunner().invoke(cli, ["systemd", "render", "--index", "/etc/model-zoo/index.json", "--exec", AGENT, flag, FLAGS[flag] + INJECTION])
    assert result.exit_code == 2 and result.output == f"{flag}: control character U+000A in the value; a unit file cannot hold it\n"


@pytest.mark.parametrize(("args", "message"), [
    (["--user", "model zoo"], "--user: not a user name systemd accepts (letters, digits, '_' and '-', at most 31): 'model zoo'"),
    (["--group", "%n"], "--group: not a group name systemd accepts (letters, digits, '_' and '-', at most 31): '%n'"),
    (["--memory-max", "8G ExecStartPre=/bin/sh"], "--memory-max: expected bytes with an optional K/M/G/T/P/E suffix, a percentage or"
                                                  " 'infinity': '8G ExecStartPre=/bin/sh'"),
    (["--memory-max", "50%%"], "--memory-max: expected bytes with an optional K/M/G/T/P/E suffix, a percentage or 'infinity': '50%%'"),
    (["--verify-interval", "weekly\\"], "--verify-interval: a trailing backslash, which systemd reads as a line continuation: 'weekly\\\\'"),
    (["--verify-interval", " weekly"], "--verify-interval: leading or trailing whitespace, which systemd strips: ' weekly'"),
    (["--hf-token-file", "/run/keys/hf "], "--hf-token-file: leading or trailing whitespace, which systemd strips: '/run/keys/hf '"),
    (["--env", "A B=c"], "--env: not an environment variable name (letters, digits and '_', not first a digit): 'A B'"),
    (["--env", "1A=c"], "--env: not an environment variable name (letters, digits and '_', not first a digit): '1A'"),
    (["--exec", "zoo-agent"], "--exec: the program must be an absolute path: 'zoo-agent'"),
    (["--exec", "'/opt/$x/zoo-agent'"], "--exec: '$' in the program path (systemd substitutes variables in argv[0] but not in the path it runs):"
                                        " '/opt/$x/zoo-agent'"),
    (["--exec", "'/opt/it\"s/zoo-agent'"], "--exec: a quote or backslash in the program path, which systemd refuses to run: '/opt/it\"s/zoo-agent'"),
    (["--exec", "'/opt/zoo"], "--exec: No closing quotation"),
    (["--root", "/srv/a:b"], "--root: ':' cannot be in the zoo user's home directory (a passwd field): /srv/a:b"),
    (["--host", "caf\udce9"], "--host: not valid UTF-8; a unit file cannot hold it"),
    (["--llama-server", "build/bin/llama-server"], "--llama-server: must be an absolute path (a unit has no working directory of ours): "
                                                   "build/bin/llama-server"),
    (["--llama-server", "llama-server"], "--llama-server: must be an absolute path (a unit has no working directory of ours): llama-server"),
])
def test_a_value_no_unit_can_mean_is_refused_in_one_line(tmp_path: Path, place: Path, args: list[str], message: str) -> None:
    prefix = make_victim(tmp_path / "units")
    before = snapshot(tmp_path)
    code, out, _ = install(tmp_path, place, *args)
    assert code == 2 and out.splitlines() == [message], out
    assert snapshot(tmp_path) == before


# -- accepted: systemd reads back exactly what was given ----------------------------------

@dataclass
class Parsed:
    """One unit as systemd parsed it: its settings, and each command's argv."""
    settings: dict[str, list[str]] = field(default_factory=dict)
    commands: dict[str, list[list[str]]] = field(default_factory=dict)


def systemd_reads(units: list[Path]) -> dict[str, Parsed]:
    """The units as systemd itself parsed them (verify dumps each one at debug level)."""
    plain = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)], capture_output=True, text=True)
    # verify exits 0 even for lines it ignores ("path is not absolute, ignoring: zoo"); anything it says is a defect.
    assert plain.returncode == 0 and plain.stdout + plain.stderr == "", plain.stdout + plain.stderr
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)], capture_output=True, text=True,
                          env={**os.environ, "SYSTEMD_LOG_LEVEL": "debug"})
    parsed: dict[str, Parsed] = {}
    unit = Parsed()
    command = ""
    for line in proc.stdout.splitlines():
        if found := re.fullmatch(r"\t-> Unit (\S+):", line):
            unit = parsed.setdefault(found.group(1), Parsed())
        elif found := re.fullmatch(r"\t\t-> (Exec\w+):", line):
            command = found.group(1)
        elif line.startswith("\t\t\tCommand Line: "):
            unit.commands.setdefault(command, []).append(shell_words(line.removeprefix("\t\t\tCommand Line: ")))
        elif found := re.fullmatch(r"\t\t(\w+): (.*)", line):
            unit.settings.setdefault(found.group(1), []).append(found.group(2))
    return parsed


_WORD = re.compile(r'"((?:[^"\\]|\\.)*)"|([^\s"\\]+)')


def shell_words(text: str) -> list[str]:
    """argv from systemd's quote_command_line(): words separated by one space, each bare or
    in "..." with '\\', '"', '`' and '$' backslash-escaped. The argv as systemd holds it,
    before the $-substitution it does at exec time."""
    words, pos = [], 0
    while pos < len(text):
        found = _WORD.match(text, pos)
        assert found and (found.end() == len(text) or text[found.end()] == " "), f"cannot read {text!r} at {pos}"
        words.append(found.group(2) if found.group(1) is None else re.sub(r"\\(.)", r"\1", found.group(1)))
        pos = found.end() + 1
    return words


def executed(argv: list[str]) -> list[str]:
    """argv after systemd's $-substitution, checking that it substitutes nothing: only '$$' (a '$')."""
    for arg in argv:
        assert "$" not in arg.replace("$$", ""), f"systemd would substitute a variable in {arg!r}"
    return [arg.replace("$$", "$") for arg in argv]


def directives(text: str) -> list[tuple[str, str]]:
    """(section, key) of every line: the unit's shape, whatever its values."""
    shape, section = [], ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line
        elif line and not line.startswith("#"):
            shape.append((section, line.partition("=")[0]))
    return shape


HOSTILE_ARGS = [HOSTILE, "%n", "$MAINPID", "${HOME}", ";", "", "-x", "'", '"']
LLAMA_SERVER = f"/opt/my llama {HOSTILE}/llama-server"
HOSTILE_FLAGS = ["--env", f"HOSTILE={HOSTILE}", "--host", HOSTILE, "--hf-endpoint", f"http://hub.internal/{HOSTILE}",
                 "--listen", f"127.0.0.1:8000 {HOSTILE}", "--ollama-host", f"127.0.0.1:11434 {HOSTILE}",
                 "--root", f"/srv/my zoo {HOSTILE}", "--hf-token-file", "/run/my keys/hf 100% $x",
                 "--memory-max", "50%", "--verify-interval", "Mon,Thu *-*-* 04:30:00 UTC",
                 "--user", "zoo_user-1", "--group", "zoo_group-1", "--llama-server", LLAMA_SERVER,
                 *(a for arg in HOSTILE_ARGS for a in ("--extra-arg", arg))]


@needs_analyze
def test_hostile_values_round_trip_through_systemd(tmp_path: Path, place: Path) -> None:
    code, out, prefix = install(tmp_path, place, *HOSTILE_FLAGS)
    assert code == 0, out
    parsed = systemd_reads(sorted(prefix.iterdir()))
    agent = str(place / "zoo-agent")
    assert {name: unit.commands for name, unit in parsed.items()} == {
        "model-zoo-reconcile.service": {"ExecStart": [[agent, "apply"]]},
        "model-zoo-resident.service": {"ExecStart": [[agent, "resident", *(a.replace("$", "$$") for a in ["--llama-server", LLAMA_SERVER, *HOSTILE_ARGS])]],
                                       "ExecReload": [[agent, "resident", "reload", "--pid", "$MAINPID"]]},
        "model-zoo-verify.service": {"ExecStart": [[agent, "verify"]]},
        "model-zoo-verify.timer": {}}
    assert executed(parsed["model-zoo-resident.service"].commands["ExecStart"][0]) == [agent, "resident", "--llama-server", LLAMA_SERVER, *HOSTILE_ARGS]
    common = [f"ZOO_ROOT=/srv/my zoo {HOSTILE}", f"ZOO_INDEX={place}/index.json", f"ZOO_HOST={HOSTILE}",
              f"HF_ENDPOINT=http://hub.internal/{HOSTILE}", f"OLLAMA_HOST=127.0.0.1:11434 {HOSTILE}", "PYTHONUNBUFFERED=1"]
    for name in ("model-zoo-reconcile.service", "model-zoo-resident.service", "model-zoo-verify.service"):
        settings = parsed[name].settings
        listen = [f"ZOO_LISTEN=127.0.0.1:8000 {HOSTILE}"] if name == "model-zoo-resident.service" else []
        assert settings["Environment"] == [*common, *listen, f"HOSTILE={HOSTILE}"], name
        # systemd's dump joins the paths with spaces, so "not split" rests on verify's silence above:
        # a split path would leave words like "zoo" that verify calls "not absolute, ignoring".
        cgroup = [f"-{RESIDENT_CGROUP}"] if name == "model-zoo-resident.service" else []
        assert settings["ReadWritePaths"] == [" ".join([f"/srv/my zoo {HOSTILE}", *cgroup])], name
        assert settings["User"] == ["zoo_user-1"] and settings["Group"] == ["zoo_group-1"], name
    assert parsed["model-zoo-resident.service"].settings["MemoryMax"] != [str(2**64 - 1)]  # 50% of RAM, not ignored
    assert parsed["model-zoo-verify.timer"].settings["OnCalendar"] == ["Mon,Thu *-*-* 04:30:00 UTC"]
    # LoadCredential= is not in 252's dump: verify's silence above says it parsed, the line says how.
    assert "LoadCredential=hf-token:/run/my keys/hf 100%% $x\n" in (prefix / "model-zoo-reconcile.service").read_text()


@needs_analyze
def test_a_root_under_var_lib_with_spaces_is_one_state_directory(tmp_path: Path, place: Path) -> None:
    code, out, prefix = install(tmp_path, place, "--root", "/var/lib/my zoo 100% $x")
    assert code == 0, out
    parsed = systemd_reads(sorted(prefix.iterdir()))
    assert parsed["model-zoo-reconcile.service"].settings["StateDirectory"] == ["my zoo 100% $x"]
    assert "ReadWritePaths" not in parsed["model-zoo-reconcile.service"].settings


def test_hostile_values_add_no_directive(tmp_path: Path, place: Path) -> None:
    """The units have exactly the lines the same flags with plain values give."""
    plain = ["--env", "HOSTILE=x", "--host", "h", "--hf-endpoint", "http://hub", "--listen", "127.0.0.1:8000", "--ollama-host", "o:1",
             "--root", "/srv/zoo", "--hf-token-file", "/run/keys/hf", "--memory-max", "8G", "--verify-interval", "weekly",
             "--user", "u", "--group", "g", "--llama-server", "/opt/llama-server", *(a for _ in HOSTILE_ARGS for a in ("--extra-arg", "a"))]
    (tmp_path / "plain").mkdir()
    code, out, prefix = install(tmp_path / "plain", place, *plain)
    assert code == 0, out
    shapes = {p.name: directives(p.read_text()) for p in prefix.iterdir()}
    code, out, prefix = install(tmp_path, place, *HOSTILE_FLAGS)
    assert code == 0, out
    assert {p.name: directives(p.read_text()) for p in prefix.iterdir()} == shapes


@needs_sysusers
def test_the_zoo_users_home_round_trips_through_systemd_sysusers(tmp_path: Path, place: Path) -> None:
    root = f"/srv/my zoo {HOSTILE}"
    code, out, _ = install(tmp_path, place, "--root", root)
    assert code == 0, out
    image = tmp_path / "image"
    (image / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow"):
        (image / "etc" / name).touch()
    proc = subprocess.run(["systemd-sysusers", f"--root={image}", str(tmp_path / "sysusers" / "model-zoo.conf")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (entry,) = [line.split(":") for line in (image / "etc" / "passwd").read_text().splitlines() if line.startswith("model-zoo:")]
    assert entry[4:] == ["model zoo", root, "/usr/sbin/nologin"]
