"""Under a real, booted systemd: what `systemctl status` shows is what is true (issue #8).

One container per module, the units installed by `zoo-agent systemd install`; the
scenarios run in file order on it (start, reload, watchdog, stop, security, crash loop,
then several tenants on one host: issue #20; that last one starts from whatever the
others left and needs none of it).
Set ZOO_E2E_CAPTURE=DIR to keep the `systemctl status` text docs/systemd.md quotes
(`resident-status.txt`: one tenant after a reload; `resident-status-tenants.txt`: three
tenants, one paged out, after a reload that swapped one of them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.container import AGENT, Container, build_root, missing_tools
from zoo_agent.index.fmt import canonical_text
from zoo_agent.pin import Selection, pin_directory

pytestmark = [pytest.mark.e2e, pytest.mark.resident, pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools()))]

REPO = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).with_name("client.py")
WATCHDOG_SEC = 10
DRAIN_SECONDS = 30  # the resident's drain window on stop (ResidentConfig.drain_seconds)
# Measured on systemd 252 in the container: 1.2 for every unit ("OK"); the goal was 2.5.
EXPOSURE_LIMIT = 1.5
RESIDENT, RECONCILE = "model-zoo-resident.service", "model-zoo-reconcile.service"
CAPTURE = os.environ.get("ZOO_E2E_CAPTURE")  # read at import: a fixture clears ZOO_* for each test
# The resident's STATUS= line (its status_line) with one tenant: "1 tenant: chat tiny@1 (idle 4s, 3.0 tok/s); 742 requests".
BUSY = r"(idle( \S+)?|\d+ running(, \d+ waiting)?)(, [\d.]+ tok/s)?(, mem [\d.]+ [kMGT]?B, est\. [\d.]+ [kMGT]?B)?"  # mem: issue #34
STATUS_ONE = rf"1 tenant: chat %s \({BUSY}\); \d+ requests"


def write_index(data: Path, version: str) -> None:
    """The index the units read (/srv/e2e/index.json): tenant 'chat' on host 'local' serving tiny@VERSION."""
    index = {
        "models": {"tiny": {"version": version, "source": {"type": "file", "path": f"v{version}"},
                            "files": pin_directory(data / f"v{version}", Selection()), "license": "MIT"}},
        "tenants": {"chat": {"model": "tiny", "generation": {"temperature": 0, "max_tokens": 16}}},
        "hosts": {"local": {"resident": "chat"}},
    }  # fmt: skip
    (data / "index.json").write_text(canonical_text(index))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Versions 1 and 2 of a tiny model, a version 3 whose weights cannot load (hashes pinned all the same), and two
    versions of another tiny model (coder)."""
    from zoo_agent.demo.tiny import build_tiny_model

    data = tmp_path_factory.mktemp("e2e")
    build_tiny_model(data / "v1", seed=0)
    build_tiny_model(data / "v2", seed=1)
    shutil.copytree(data / "v1", data / "v3")
    (data / "v3" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    build_tiny_model(data / "coder1", seed=2)  # a second model for the tenants scenario
    build_tiny_model(data / "coder2", seed=3)
    subprocess.run(["chmod", "-R", "a+rX", str(data)], check=True)  # the service user reads the source
    write_index(data, "1")
    return data


def _model(data: Path, source: str, version: str) -> dict[str, object]:
    return {"version": version, "source": {"type": "file", "path": source},
            "files": pin_directory(data / source, Selection()), "license": "MIT"}  # fmt: skip


def write_tenants_index(data: Path, coder: str, budget: str | None) -> None:
    """Host 'local' serves three tenants: 'chat' (tiny@1, pinned), 'code' (coder@CODER) and 'summarize' (tiny@1)."""
    gen = {"generation": {"temperature": 0, "max_tokens": 4}, "resources": {"max_batch": 2, "max_queue": 8}}
    index = {
        "models": {"tiny": _model(data, "v1", "1"), "coder": _model(data, f"coder{coder}", coder)},
        "tenants": {"chat": {"model": "tiny", "pinned": True, **gen}, "code": {"model": "coder", **gen},
                    "summarize": {"model": "tiny", **gen}},
        "hosts": {"local": {"tenants": ["chat", "code", "summarize"], **({"memory_budget": budget} if budget else {})}},
    }  # fmt: skip
    (data / "index.json").write_text(canonical_text(index))


def two_tenants_budget(data: Path) -> str:
    """Bytes for two of the three tenants, not three (the estimate the resident pages by; the three are one size).
    Writes the tenants' index without a budget to read it."""
    from zoo_agent.index.fit import read_config, tenant_footprint
    from zoo_agent.index.load import load_index

    write_tenants_index(data, "1", None)
    idx = load_index(data / "index.json", "index.json")
    need = max(tenant_footprint(idx, t, read_config(data / ("coder1" if t == "code" else "v1"))).total for t in idx.tenants)
    return str(int(need * 2.5))


@pytest.fixture(scope="module")
def machine(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    try:
        root = build_root()
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"no Debian root could be built here (debootstrap needs the Debian mirror): {exc}")
    log = tmp_path_factory.mktemp("nspawn") / "console.log"
    container = Container(root, name=f"zoo-e2e-{os.getpid()}", log=log, bind={data: "/srv/e2e"},
                          bind_ro={Path(site.getsitepackages()[0]): "/opt/zoo/deps",
                                   # The package, not the checkout: a clone into `mktemp -d` is 0700,
                                   # which the service user could not enter.
                                   REPO / "zoo_agent": "/opt/zoo/src/zoo_agent"})
    try:
        container.install_agent()
        container.run(AGENT, "systemd", "install", "--index", "/srv/e2e/index.json", "--host", "local",
                      "--exec", AGENT, "--watchdog-sec", str(WATCHDOG_SEC))
        yield container
    finally:
        container.poweroff()


def client(machine: Container, *args: str) -> subprocess.Popen[str]:
    return machine.on_loopback([sys.executable, str(CLIENT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def worker_pids(machine: Container, main_pid: str) -> list[str]:
    return machine.sh(f"cat /proc/{main_pid}/task/*/children").stdout.split()


def test_start_publishes_then_serves_only_after_ready(machine: Container) -> None:
    machine.run("systemctl", "start", RECONCILE, timeout=300)
    shown = machine.show(RECONCILE, "ActiveState", "SubState", "Result", "StatusText")
    assert (shown["ActiveState"], shown["SubState"], shown["Result"]) == ("active", "exited", "success"), machine.journal(RECONCILE)
    assert shown["StatusText"].startswith("apply: the zoo matches the index"), shown
    assert machine.sh("readlink /var/lib/model-zoo/models/tiny/current; stat -c %U:%G:%a /var/lib/model-zoo").stdout.split() == [
        "versions/1", "model-zoo:model-zoo:750"]

    machine.run("systemctl", "start", "--no-block", RESIDENT)
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        shown = machine.show(RESIDENT, "ActiveState", "SubState", "StatusText")
        seen.append((shown["ActiveState"], shown["StatusText"]))
        if shown["ActiveState"] != "activating":
            break
        time.sleep(0.1)
    assert shown["ActiveState"] == "active" and shown["SubState"] == "running", machine.journal(RESIDENT)
    assert any(state == "activating" for state, _ in seen), seen  # loading takes seconds, and is not "active"
    # READY=1 came after a real generation: the API answers at once.
    proc = client(machine, "long", "3")
    out, err = proc.communicate(timeout=60)
    answer = json.loads(out)
    assert answer["chunks"] > 0 and (answer["done"], answer["finish"], answer["error"]) == (True, "length", None), (answer, err)
    assert re.fullmatch(STATUS_ONE % "tiny@1", machine.show(RESIDENT, "StatusText")["StatusText"])
    status = machine.status(RESIDENT)
    assert "Active: active (running)" in status and 'Status: "1 tenant: chat tiny@1 (' in status, status


def test_reload_swaps_to_the_new_version_without_a_failed_request(machine: Container, data: Path, tmp_path: Path) -> None:
    stop = tmp_path / "stop"
    loop = client(machine, "loop", str(stop))
    time.sleep(2)
    write_index(data, "2")
    machine.run("systemctl", "restart", RECONCILE, timeout=300)  # what a switch does when the index changed
    started = time.monotonic()
    reload = machine.run("systemctl", "reload", RESIDENT, timeout=300, check=False)
    reload_seconds = time.monotonic() - started
    status_after_reload = machine.show(RESIDENT, "StatusText", "ActiveState")
    time.sleep(6)  # the Status: line is refreshed every 5 s
    stop.touch()
    out, err = loop.communicate(timeout=120)
    result = json.loads(out)
    assert reload.returncode == 0, reload.stderr + machine.journal(RESIDENT)[-3000:]
    assert status_after_reload["ActiveState"] == "active" and status_after_reload["StatusText"].startswith("1 tenant: chat tiny@2 ("), status_after_reload
    assert result["failed"] == 0 and result["ok"] > 0, result
    assert "tiny@2" in result["fingerprints"], result
    print(f"reload returned after {reload_seconds:.1f}s; {result['ok']} requests, none failed")
    if CAPTURE:  # docs/systemd.md quotes it
        Path(CAPTURE).mkdir(parents=True, exist_ok=True)
        (Path(CAPTURE) / "resident-status.txt").write_text(machine.status(RESIDENT))


def test_a_frozen_worker_is_replaced_by_the_supervisor(machine: Container) -> None:
    before = machine.show(RESIDENT, "MainPID", "NRestarts")
    (worker,) = worker_pids(machine, before["MainPID"])
    machine.sh(f"kill -STOP {worker}")  # the shell's kill: minbase has no procps
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        now = worker_pids(machine, before["MainPID"])
        if now and worker not in now and machine.show(RESIDENT, "StatusText")["StatusText"].startswith("1 tenant: chat tiny@2 ("):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(machine.journal(RESIDENT)[-3000:])
    after = machine.show(RESIDENT, "MainPID", "NRestarts", "ActiveState")
    assert (after["MainPID"], after["NRestarts"], after["ActiveState"]) == (before["MainPID"], before["NRestarts"], "active")
    proc = client(machine, "long", "2")
    assert json.loads(proc.communicate(timeout=60)[0])["done"] is True


def test_a_frozen_supervisor_is_killed_by_the_watchdog_and_restarted(machine: Container) -> None:
    before = machine.show(RESIDENT, "MainPID", "NRestarts")
    machine.sh(f"kill -STOP {before['MainPID']}")
    deadline = time.monotonic() + WATCHDOG_SEC + 120
    while time.monotonic() < deadline:
        now = machine.show(RESIDENT, "MainPID", "NRestarts", "ActiveState", "SubState")
        if int(now["NRestarts"]) > int(before["NRestarts"]) and (now["ActiveState"], now["SubState"]) == ("active", "running"):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"{now}\n{machine.journal(RESIDENT)[-3000:]}")
    assert now["MainPID"] != before["MainPID"]
    assert f"Watchdog timeout (limit {WATCHDOG_SEC}s)!" in machine.journal(RESIDENT)


def test_stop_finishes_the_request_in_flight(machine: Container) -> None:
    proc = client(machine, "long", "2000")
    assert proc.stderr is not None
    assert proc.stderr.readline().strip() == "started"
    time.sleep(1)
    started = time.monotonic()
    machine.run("systemctl", "stop", "--no-block", RESIDENT)
    seen = set()
    while time.monotonic() - started < 120:
        shown = machine.show(RESIDENT, "ActiveState", "StatusText", "Result")
        seen.add((shown["ActiveState"], shown["StatusText"]))
        if shown["ActiveState"] == "inactive":
            break
        time.sleep(0.1)
    stop_seconds = time.monotonic() - started
    out, _ = proc.communicate(timeout=60)
    answer = json.loads(out)
    # STOPPING=1 with our Status: while the request finished, then a clean exit.
    assert ("deactivating", "stopping; finishing in-flight requests (up to 30s)") in seen, seen
    assert (shown["ActiveState"], shown["Result"]) == ("inactive", "success"), shown
    assert stop_seconds < 60  # TimeoutStopSec
    assert answer["chunks"] > 0 and answer["error"] is None, answer
    if not answer["done"]:  # only a machine too loaded to finish 2,000 tokens in the drain window may cut it
        assert stop_seconds >= DRAIN_SECONDS, (answer, stop_seconds)
    else:
        assert answer["finish"] == "length", answer
    print(f"stopped in {stop_seconds:.1f}s with a 2,000-token request in flight ({'finished' if answer['done'] else 'cut at the drain bound'})")


@pytest.mark.parametrize("unit", [RESIDENT, RECONCILE, "model-zoo-verify.service"])
def test_exposure_score(machine: Container, unit: str) -> None:
    out = machine.run("systemd-analyze", "security", "--no-pager", unit).stdout
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", out)
    assert found, out
    print(f"{unit}: {found.group(1)} {found.group(2)}")
    assert float(found.group(1)) <= EXPOSURE_LIMIT, out


def test_weights_that_cannot_load_end_failed_not_in_an_endless_restart(machine: Container, data: Path) -> None:
    # RestartSec=1 instead of 5 so the five starts take seconds, not half a minute: a drop-in, as an operator would.
    machine.sh("mkdir -p /etc/systemd/system/model-zoo-resident.service.d && "
               "printf '[Service]\\nRestartSec=1\\n' > /etc/systemd/system/model-zoo-resident.service.d/test.conf && systemctl daemon-reload")
    machine.run("systemctl", "stop", RESIDENT, timeout=120)
    write_index(data, "3")
    machine.run("systemctl", "restart", RECONCILE, timeout=300)
    machine.run("systemctl", "start", "--no-block", RESIDENT)
    shown = machine.wait_for(RESIDENT, {"ActiveState": "failed"}, timeout=240)
    time.sleep(3)  # and it stays failed
    shown = machine.show(RESIDENT, "ActiveState", "Result", "NRestarts", "StatusText")
    assert shown["ActiveState"] == "failed" and shown["Result"] in ("start-limit-hit", "exit-code"), shown
    assert int(shown["NRestarts"]) <= 5, shown
    print(f"ended {shown['Result']} after {shown['NRestarts']} restarts; Status: {shown['StatusText']!r}")
    assert "cannot load tiny@3" in shown["StatusText"] or "cannot load tiny@3" in machine.status(RESIDENT), (shown, machine.status(RESIDENT))



def _get(machine: Container, path: str) -> dict[str, object]:
    out, _ = client(machine, "get", path).communicate(timeout=30)
    return json.loads(out)  # type: ignore[no-any-return]


def _worker_of(machine: Container, tenant: str) -> dict[str, object]:
    """The tenant's model-info.json: its worker's pid and the version it loaded."""
    return json.loads(machine.sh(f"cat /var/lib/model-zoo/resident/tenants/{tenant}/model-info.json").stdout)  # type: ignore[no-any-return]


def _answered_gaps(answered: list[float], start: float, end: float) -> tuple[int, float]:
    """How many answers came in [start, end], and the longest stretch of it without one."""
    inside = [t for t in answered if start <= t <= end]
    edges = [start, *inside, end]
    return len(inside), max(b - a for a, b in zip(edges, edges[1:], strict=False))


def test_several_tenants_page_and_reload_one_while_another_serves(machine: Container, data: Path, tmp_path: Path) -> None:
    """Issue #20 under systemd: `Status:` names the loaded and the paged-out tenants; a reload swaps one
    tenant's version with no failed request while another tenant answers the whole time."""
    # From whatever the scenarios before left (a unit failed by its crash loop): a fresh start on the tenants' index.
    machine.run("systemctl", "stop", RESIDENT, timeout=120)
    machine.run("systemctl", "reset-failed", RESIDENT, check=False)
    machine.sh("rm -rf /etc/systemd/system/model-zoo-resident.service.d && systemctl daemon-reload")  # the unit as installed
    budget = two_tenants_budget(data)
    write_tenants_index(data, "1", budget)
    machine.run("systemctl", "restart", RECONCILE, timeout=300)
    assert machine.show(RECONCILE, "Result")["Result"] == "success", machine.journal(RECONCILE)[-3000:]
    machine.run("systemctl", "start", RESIDENT, timeout=180)  # Type=notify: returns at READY (chat, the pinned one, answered)

    # summarize loads beside chat (room for two); code's first request then pages it out (least recently used, not pinned).
    answer = json.loads(client(machine, "long", "2", "summarize").communicate(timeout=120)[0])
    assert answer["done"] is True, answer
    stop = tmp_path / "stop"
    loops = {tenant: client(machine, "loop", str(stop), tenant, "0.02") for tenant in ("chat", "code")}
    paged = rf"3 tenants: chat tiny@1 \({BUSY}\), code coder@%s \({BUSY}\); paged out: summarize; \d+ requests"
    try:
        deadline = time.monotonic() + 60
        while not re.fullmatch(paged % "1", status := machine.show(RESIDENT, "StatusText")["StatusText"]):
            assert time.monotonic() < deadline, f"{status!r}\n{machine.journal(RESIDENT)[-3000:]}"
            time.sleep(0.5)
        shown = machine.status(RESIDENT)
        assert f'Status: "{status}"' in shown, shown
        health = _get(machine, "/health")
        states = {t: (h["state"], h["version"]) for t, h in health["tenants"].items()}  # type: ignore[attr-defined]
        assert states == {"chat": ("serving", "1"), "code": ("serving", "1"), "summarize": ("paged_out", None)}, health
        chat_before, code_before = _worker_of(machine, "chat")["pid"], _worker_of(machine, "code")["pid"]

        # Publish coder@2 (what a switch does: apply moves `current`), then reload: only code swaps.
        write_tenants_index(data, "2", budget)
        started = time.monotonic()
        machine.run("systemctl", "restart", RECONCILE, timeout=300)
        reload = machine.run("systemctl", "reload", RESIDENT, timeout=300, check=False)
        reloaded = time.monotonic()
        assert reload.returncode == 0, reload.stderr + machine.journal(RESIDENT)[-3000:]
        deadline = time.monotonic() + 30
        while not re.fullmatch(paged % "2", status := machine.show(RESIDENT, "StatusText")["StatusText"]):
            assert time.monotonic() < deadline, f"{status!r}\n{machine.journal(RESIDENT)[-3000:]}"
            time.sleep(0.5)
        time.sleep(6)  # the Status: line is refreshed every 5 s: one written after the swap, both loops still running
        shown = machine.status(RESIDENT)
        assert re.search(rf'Status: "{paged % "2"}"', shown), shown
    finally:
        stop.touch()
    results = {tenant: json.loads(proc.communicate(timeout=120)[0]) for tenant, proc in loops.items()}
    chat, code = results["chat"], results["code"]
    assert chat["failed"] == 0 and code["failed"] == 0, {t: {k: r[k] for k in ("ok", "failed", "errors")} for t, r in results.items()}
    assert chat["fingerprints"].keys() == {"tiny@1"}, chat["fingerprints"]
    assert code["fingerprints"].keys() == {"coder@1", "coder@2"}, code["fingerprints"]
    # chat kept answering while apply published coder@2 and the reload swapped it (loads take seconds on 2 cores).
    during, gap = _answered_gaps(chat["answered"], started, reloaded)
    assert during > 0 and gap < 5, (during, gap, reloaded - started)
    assert _worker_of(machine, "chat")["pid"] == chat_before  # the reload left chat's worker alone
    assert (info := _worker_of(machine, "code"))["pid"] != code_before and info["version"] == "2", info
    journal = machine.journal(RESIDENT)
    assert "summarize: paged out (budget" in journal, journal[-3000:]
    # Two versions of code do not fit the budget beside chat: the reload stopped coder@1 first and the
    # router held code's requests until coder@2 served (the path this exercises; none failed, above).
    assert "memory does not allow two versions of code at once" in journal, journal[-3000:]
    print(f"publish + reload took {reloaded - started:.1f}s; chat answered {during} times meanwhile (longest gap {gap:.1f}s); "
          f"{chat['ok']} chat and {code['ok']} code requests, none failed")
    if CAPTURE:  # docs/systemd.md quotes it
        Path(CAPTURE).mkdir(parents=True, exist_ok=True)
        (Path(CAPTURE) / "resident-status-tenants.txt").write_text(shown)
