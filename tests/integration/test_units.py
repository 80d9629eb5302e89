"""`zoo-agent systemd render|install`: the units hosts without NixOS get (issue #7)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from zoo_agent.cli.main import cli
from zoo_agent.systemd.units import UnitSettings, render

REPO = Path(__file__).resolve().parents[2]
AGENT = str(Path(sys.executable).parent / "zoo-agent")
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (Debian: systemd)")
# Measured with `systemd-analyze security --offline=yes` on systemd 252: both units 1.2 "OK".
EXPOSURE_LIMIT = 1.5


@pytest.fixture
def visible() -> Iterator[Path]:
    """A directory the units' sandbox would not hide (not under /tmp, /root or /home, where
    checkouts and pytest's tmp_path live), holding the index and a link to this zoo-agent."""
    if not os.access("/run", os.W_OK):
        pytest.skip("needs a writable /run for paths outside /tmp (run as root)")
    place = Path(tempfile.mkdtemp(prefix="zoo-units-", dir="/run"))
    shutil.copy(REPO / "index.json", place / "index.json")
    (place / "zoo-agent").symlink_to(AGENT)
    yield place
    shutil.rmtree(place)


def install(tmp_path: Path, place: Path, *args: str) -> tuple[int, str, Path]:
    prefix = tmp_path / "units"
    prefix.mkdir(exist_ok=True)
    result = CliRunner().invoke(cli, ["systemd", "install", "--index", str(place / "index.json"), "--exec", str(place / "zoo-agent"),
                                      "--prefix", str(prefix), "--sysusers-dir", str(tmp_path / "sysusers"), "--no-activate", *args])
    return result.exit_code, result.output, prefix


def test_install_writes_the_units_once_then_reports_them_unchanged(tmp_path: Path, visible: Path) -> None:
    code, out, prefix = install(tmp_path, visible, "--json")
    assert code == 0, out
    files = json.loads(out)["files"]
    assert {Path(f["path"]).name for f in files} == {"model-zoo-reconcile.service", "model-zoo-resident.service",
                                                      "model-zoo-verify.service", "model-zoo-verify.timer", "model-zoo.conf"}
    assert all(f["changed"] for f in files)
    assert (tmp_path / "sysusers" / "model-zoo.conf").read_text().splitlines()[1:] == [
        "g model-zoo -", 'u model-zoo -:model-zoo "model zoo" "/var/lib/model-zoo" /usr/sbin/nologin']
    code, out, _ = install(tmp_path, visible, "--json")
    assert code == 0 and not any(f["changed"] for f in json.loads(out)["files"])
    code, out, _ = install(tmp_path, visible, "--listen", "127.0.0.1:9000")
    assert code == 0
    assert f"wrote {prefix}/model-zoo-resident.service" in out and f"unchanged {prefix}/model-zoo-reconcile.service" in out
    assert 'Environment="ZOO_LISTEN=127.0.0.1:9000"' in (prefix / "model-zoo-resident.service").read_text()


def test_dry_run_writes_nothing(tmp_path: Path, visible: Path) -> None:
    code, out, prefix = install(tmp_path, visible, "--dry-run")
    assert code == 0 and "would write" in out and "next:" not in out
    assert list(prefix.iterdir()) == [] and not (tmp_path / "sysusers").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--exec", "/root/venv/bin/zoo-agent"], "ExecStart /root/venv/bin/zoo-agent is under /root (hidden from the service by the unit's sandbox);"),
    (["--api-key-file", "/tmp/key"], "api key file /tmp/key is under /tmp (hidden from the service by the unit's sandbox);"),
    (["--textfile-dir", "/tmp/metrics"], "textfile dir /tmp/metrics is under /tmp (hidden from the service by the unit's sandbox);"),
    (["--root", "zoo"], "--root: must be an absolute path (a unit has no working directory of ours): zoo"),
    (["--env", "NOEQUALS"], "--env 'NOEQUALS': expected KEY=VALUE"),
    (["--hf-cache", "/tmp/view"], "hf cache /tmp/view is under /tmp (hidden from the service by the unit's sandbox);"),
    (["--hf-cache", "/var/lib/model-zoo/view"], "--hf-cache: /var/lib/model-zoo/view and the zoo at /var/lib/model-zoo overlap:"),
    (["--hf-cache", "/var/lib", "--root", "/var/lib/zoo"], "--hf-cache: /var/lib and the zoo at /var/lib/zoo overlap:"),
    (["--hf-cache", "view"], "--hf-cache: must be an absolute path"),
    (["--llama-server", "/home/ops/llama.cpp/build/bin/llama-server"],
     "llama-server /home/ops/llama.cpp/build/bin/llama-server is under /home (hidden from the service by the unit's sandbox);"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, visible: Path, args: list[str], message: str) -> None:
    code, out, prefix = install(tmp_path, visible, *args)
    assert code == 2 and out.splitlines()[-1].startswith(message), out
    assert list(prefix.iterdir()) == []


@pytest.mark.parametrize(("directory", "hidden"), [("/tmp/metrics", "/tmp"), ("/var/tmp/m", "/var/tmp"), ("/home/ops/metrics", "/home")])
def test_render_warns_that_a_textfile_dir_the_sandbox_hides_never_reaches_node_exporter(directory: str, hidden: str) -> None:
    """PrivateTmp=yes gives the units a /tmp of their own: metrics written there never reach
    node_exporter. The fleet key file got this warning; the textfile directory did not (issue #31)."""
    result = CliRunner().invoke(cli, ["systemd", "render", "--index", "/etc/model-zoo/index.json", "--exec", AGENT, "--textfile-dir", directory])
    assert result.exit_code == 0
    # (A checkout under /tmp, as a CI clone may be, adds its own line about ExecStart.)
    assert f"zoo-agent: textfile dir {directory} is under {hidden} (hidden from the service by the unit's sandbox)" in result.stderr.splitlines()
    clean = CliRunner().invoke(cli, ["systemd", "render", "--index", "/etc/model-zoo/index.json", "--exec", AGENT,
                                     "--textfile-dir", "/var/lib/prometheus/node-exporter"])  # fmt: skip
    assert clean.exit_code == 0 and "textfile dir" not in clean.stderr


def test_an_invalid_index_is_refused_before_anything_is_written(tmp_path: Path, visible: Path) -> None:
    bad = tmp_path / "index.json"
    bad.write_text('{"models": {"m": {"version": "1"}}}')
    code, out, prefix = install(tmp_path, visible, "--index", str(bad))
    assert code == 2 and f"{bad}: /models/m: " in out
    assert list(prefix.iterdir()) == []


def test_environment_values_survive_quoting() -> None:
    settings = UnitSettings(exec_start=(AGENT,), index=Path("/etc/model-zoo/index.json"),
                            environment={"A": 'two words "quoted" 100% \\ back', "B": "plain"})
    text = render(settings)["model-zoo-reconcile.service"]
    assert 'Environment="A=two words \\"quoted\\" 100%% \\\\ back"' in text and 'Environment="B=plain"' in text
    assert render(settings) == render(settings)


@needs_analyze
@pytest.mark.parametrize("variant", [[], ["--gpu", "nvidia", "--memory-max", "8G", "--api-key-file", "/etc/model-zoo/key", "--gc",
                                          "--hf-cache", "VISIBLE/hf view $x"],
                                     ["--gpu", "rocm", "--listen", "unix:/run/model-zoo/api.sock", "--env", "A=b c"]])
def test_rendered_units_pass_systemd_analyze_verify(tmp_path: Path, visible: Path, variant: list[str]) -> None:
    code, out, prefix = install(tmp_path, visible, *(arg.replace("VISIBLE", str(visible)) for arg in variant))
    assert code == 0, out
    units = sorted(str(p) for p in prefix.iterdir())
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True)
    # verify exits 0 even for lines it ignores; anything it says is a defect.
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


@needs_analyze
@pytest.mark.parametrize("unit", ["model-zoo-reconcile.service", "model-zoo-resident.service", "model-zoo-verify.service"])
def test_exposure_score(tmp_path: Path, visible: Path, unit: str) -> None:
    _, _, prefix = install(tmp_path, visible)
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(prefix / unit)], capture_output=True, text=True)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    assert float(found.group(1)) <= EXPOSURE_LIMIT, proc.stdout
