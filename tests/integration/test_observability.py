"""Observability (issue #25): a real Prometheus scrapes a real resident and the textfile a
real `zoo-agent apply` wrote; every dashboard panel's and alert rule's PromQL is evaluated
there through the HTTP API.

Prometheus is Debian's binary (`.ci/setup` installs it), started by the test on 127.0.0.1
with a generated config, a tmp storage directory and a 1 s scrape interval. The textfile
is read by Debian's real `prometheus-node-exporter` (textfile collector only) when it is
installed; otherwise a tiny loopback HTTP handler in this file serves the directory's
``*.prom`` files, as the textfile collector would (concatenated).
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.world import World

pytestmark = pytest.mark.resident

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "examples" / "prometheus" / "model-zoo-rules.yml"
RULE_TESTS = REPO / "examples" / "prometheus" / "model-zoo-rules.test.yml"
DASHBOARD = REPO / "examples" / "grafana" / "model-zoo.json"
PROMETHEUS, PROMTOOL, NODE_EXPORTER = (shutil.which(n) for n in ("prometheus", "promtool", "prometheus-node-exporter"))
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None,
                                      reason="prometheus/promtool not installed (apt-get install prometheus; .ci/setup does)")

# Panels that can only show data after an event this test does not cause, with the reason.
ALLOWED_EMPTY: dict[str, str] = {}

# Grafana's variables, as "All" would expand them.
VARIABLES = {"$__rate_interval": "1m", "$instance": ".*", "$tenant": ".*", "$host": ".*"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: [(s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


def _textfile(directory: Path, command: str = "apply") -> dict[str, list[tuple[dict[str, str], float]]]:
    return _parse((directory / f"model-zoo-{command}.prom").read_text())


def _value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    (value,) = [v for lab, v in samples[name] if labels.items() <= lab.items()]
    return value


# -- the textfile, without Prometheus ---------------------------------------------------------------

def _small_world(world: World) -> World:
    world.artifact("m", "v1", {"config.json": b"{}", "weights.txt": b"w" * 4096})
    return world


def test_apply_writes_the_textfile_and_a_failed_run_keeps_the_last_success(world: World, tmp_path: Path) -> None:
    tf = tmp_path / "textfile"
    tf.mkdir()
    _small_world(world)
    assert world.run("apply", "--textfile-dir", str(tf)).exit_code == 0
    first = _textfile(tf)
    assert _value(first, "zoo_apply_last_run_success", host="h") == 1
    assert _value(first, "zoo_apply_fetched_bytes") == 4098 and _value(first, "zoo_apply_reused_bytes") == 0
    assert _value(first, "zoo_artifacts", state="ok") == 1 and _value(first, "zoo_artifacts", state="missing") == 0
    success = _value(first, "zoo_apply_last_success_timestamp_seconds")
    assert success == _value(first, "zoo_apply_last_run_timestamp_seconds") > 0
    assert oct((tf / "model-zoo-apply.prom").stat().st_mode & 0o777) == "0o644"  # node_exporter runs as another user
    # A source gone: the next apply of a new version fails; the last success is carried over.
    world.artifact("m", "v2", {"config.json": b"{}", "weights.txt": b"x" * 10})
    shutil.rmtree(world.source_dir("m", "v2"))
    assert world.run("apply", "--textfile-dir", str(tf)).exit_code == 1
    failed = _textfile(tf)
    assert _value(failed, "zoo_apply_last_run_success") == 0 and _value(failed, "zoo_apply_exit_code") == 1
    assert _value(failed, "zoo_apply_last_success_timestamp_seconds") == success
    assert _value(failed, "zoo_apply_steps", result="failed") >= 1
    assert _value(failed, "zoo_artifacts", state="outdated") == 1


def test_verify_and_gc_write_their_own_files(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tf = tmp_path / "textfile"
    tf.mkdir()
    _small_world(world)
    assert world.run("apply").exit_code == 0
    damaged = world.root / "models/m/versions/v1/weights.txt"
    damaged.chmod(0o644)
    damaged.write_bytes(b"rot")
    monkeypatch.setenv("ZOO_TEXTFILE_DIR", str(tf))
    assert world.run("verify").exit_code == 1
    verify = _textfile(tf, "verify")
    assert _value(verify, "zoo_verify_failures") == 1 and _value(verify, "zoo_verify_last_run_success") == 0
    assert _value(verify, "zoo_verify_damaged_files", kind="models", id="m", version="v1") == 1
    assert world.run("verify", "--repair").exit_code == 0
    assert _value(_textfile(tf, "verify"), "zoo_verify_failures") == 0
    assert _value(_textfile(tf, "verify"), "zoo_verify_repaired_versions") == 1
    assert world.run("gc", "--dry-run").exit_code == 0 and not (tf / "model-zoo-gc.prom").exists()  # a dry run reports nothing
    assert world.run("gc").exit_code == 0
    assert _value(_textfile(tf, "gc"), "zoo_gc_last_run_success") == 1
    assert sorted(p.name for p in tf.iterdir()) == ["model-zoo-gc.prom", "model-zoo-verify.prom"]  # apply ran before $ZOO_TEXTFILE_DIR


def test_label_values_are_escaped_and_no_secret_is_written(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tf = tmp_path / "textfile"
    tf.mkdir()
    _small_world(world)
    token = "hf_" + "s3cr3t" * 6
    monkeypatch.setenv("HF_TOKEN", token)
    (tmp_path / "token").write_text(token)
    assert world.run("apply", "--textfile-dir", str(tf), "--hf-token-file", str(tmp_path / "token")).exit_code == 0
    assert token not in (tf / "model-zoo-apply.prom").read_text()
    hostile = 'evil"} 1\nzoo_injected{a="\\'
    result = world.run("apply", "--textfile-dir", str(tf), "--host", hostile)  # not in the index: fails, reported under its name
    assert result.exit_code == 2, result.output
    text = (tf / "model-zoo-apply.prom").read_text()
    samples = _parse(text)
    assert "zoo_injected" not in samples
    assert {lab["host"] for lab, _ in samples["zoo_apply_last_run_success"]} == {hostile}
    assert token not in text and str(tmp_path) not in text
    if PROMTOOL:
        proc = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_reader_never_sees_a_partial_textfile(world: World, tmp_path: Path) -> None:
    """Like node_exporter during a scrape: read in a loop while apply rewrites the file."""
    tf = tmp_path / "textfile"
    tf.mkdir()
    _small_world(world)
    path = tf / "model-zoo-apply.prom"
    stop, seen, bad = threading.Event(), [0], []

    def read() -> None:
        while not stop.is_set():
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            seen[0] += 1
            if not text.endswith("\n") or "zoo_artifacts{" not in text or 'state="undeclared"' not in text:
                bad.append(text)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(15):
            proc = world.spawn("apply", "--textfile-dir", str(tf))
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
    finally:
        stop.set()
        reader.join()
    assert seen[0] > 0 and bad == []
    assert [p.name for p in tf.iterdir()] == ["model-zoo-apply.prom"]  # no temp file left behind


# -- the rules, with promtool ----------------------------------------------------------------------

@needs_prometheus
def test_rules_pass_promtool_and_every_alert_is_unit_tested_firing_and_not() -> None:
    assert PROMTOOL is not None
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        proc = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=RULES.parent)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    alerts = re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.MULTILINE)
    tests = RULE_TESTS.read_text()
    for alert in alerts:
        cases = re.findall(rf"alertname: {alert}\n\s+exp_alerts:( \[\])?", tests)
        assert " []" in cases and "" in cases, f"{alert}: needs a case where it fires and one where it does not"


# -- a real Prometheus over a real resident and textfile -------------------------------------------

class _TextfileHandler(http.server.BaseHTTPRequestHandler):
    directory: Path

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        body = "".join(p.read_text() for p in sorted(self.directory.glob("*.prom"))).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def textfile_target(tmp_path: Path) -> Iterator[tuple[Path, str, str]]:
    """(directory, host:port serving it, what serves it)."""
    directory = tmp_path / "textfile"
    directory.mkdir()
    port = _free_port()
    if NODE_EXPORTER:
        proc = subprocess.Popen([NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
                                 "--collector.textfile", f"--collector.textfile.directory={directory}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            yield directory, f"127.0.0.1:{port}", "node_exporter"
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        return
    handler = type("Handler", (_TextfileHandler,), {"directory": directory})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield directory, f"127.0.0.1:{port}", "loopback handler"
    finally:
        server.shutdown()


class Prometheus:
    def __init__(self, tmp: Path, targets: dict[str, str]) -> None:
        self.port = _free_port()
        config = tmp / "prometheus.yml"
        shutil.copy(RULES, tmp / RULES.name)
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [RULES.name],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in targets.items()],
        }))
        assert PROMETHEUS is not None
        self.log = (tmp / "prometheus.log").open("w")
        self.proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params: str) -> Any:
        import httpx

        response = httpx.get(f"http://127.0.0.1:{self.port}/api/v1/{path}", params=params, timeout=30)
        document = response.json()
        assert document["status"] == "success", (path, params, document)
        return document["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        return list(data["result"]) if data["resultType"] in ("vector", "matrix") else [data["result"]]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def _dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    out = []
    for panel in panels:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: a variable the test does not expand: {expr}"
            out.append((panel["title"], expr))
    return out


def _rule_exprs() -> list[tuple[str, str]]:
    import yaml  # type: ignore[import-untyped]

    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(rule.get("alert") or rule["record"], rule["expr"]) for group in groups for rule in group["rules"]]


@needs_prometheus
def test_dashboard_and_rules_against_a_real_prometheus(world: World, tmp_path: Path, textfile_target: tuple[Path, str, str]) -> None:
    pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")
    from tests.support.paging import GEN, ask, footprint
    from tests.support.resident import Resident
    from zoo_agent.demo.tiny import build_tiny_model

    directory, textfile_addr, serving = textfile_target
    tiny = build_tiny_model(tmp_path / "tiny")
    world.artifact("m", "v1", {p.name: p.read_bytes() for p in sorted(tiny.iterdir())})
    world.artifact("spare", "v1", {"notes.txt": b"kept on disk for a fast swap\n"})
    doc = {"models": world.models, "loras": {}, "tenants": {t: {"model": "m", **GEN} for t in ("a", "b")},
           "hosts": {"h": {"tenants": ["a", "b"], "available": ["spare"]}}}
    world.index.write_text(json.dumps(doc))
    budget = int(footprint(world) * 1.5)  # room for one tenant: asking the other pages the first out
    doc["hosts"]["h"]["memory_budget"] = str(budget)
    world.index.write_text(json.dumps(doc))
    assert world.run("apply", "--textfile-dir", str(directory)).exit_code == 0
    # Damage the spare model so that the verify panels have something to show.
    damaged = world.root / "models/spare/versions/v1/notes.txt"
    damaged.chmod(0o644)
    damaged.write_text("rot\n")
    assert world.run("verify", "--textfile-dir", str(directory)).exit_code == 1
    assert world.run("gc", "--textfile-dir", str(directory)).exit_code == 0

    resident = Resident(world)
    prometheus = None
    try:
        resident.notify.wait(lambda m: "READY" in m, timeout=120)
        prometheus = Prometheus(tmp_path, {"model-zoo-resident": f"127.0.0.1:{resident.port}", "node": textfile_addr})
        p = prometheus
        _wait(lambda: _try(lambda: len([r for r in p.query("up") if r["value"][1] == "1"]) == 2), 60, "both targets up")
        for tenant in ("a", "b", "a", "b"):  # each one pages the other out
            code, body = ask(resident, tenant, max_tokens=4, stream=False)
            assert code == 200, body
        _wait(lambda: _try(lambda: p.query("sum(zoo:model_evictions_total) >= 3")), 60, "the evictions scraped")
        _wait(lambda: _try(lambda: p.query("increase(zoo:router_requests_total[1m]) > 0")), 60, "requests scraped twice")
        time.sleep(3)

        empty = []
        for title, expr in _dashboard_queries():
            result = p.query(expr)  # a parse error fails inside api()
            if not result and title not in ALLOWED_EMPTY:
                empty.append(f"{title}: {expr}")
        assert empty == [], f"dashboard panels without data (textfile served by {serving}):\n" + "\n".join(empty)
        for name, expr in _rule_exprs():
            p.query(expr)
        rules = p.api("rules")
        loaded = {r["name"]: r for g in rules["groups"] for r in g["rules"]}
        assert set(loaded) == {name for name, _ in _rule_exprs()}
        assert all(r["health"] == "ok" for r in loaded.values()), [r for r in loaded.values() if r["health"] != "ok"]
        # The verify damage is seen by the rule (firing at once: it has no `for:`).
        _wait(lambda: _try(lambda: loaded_alert(p, "ModelZooVerifyFoundDamage")), 30, "ModelZooVerifyFoundDamage firing")
        assert not loaded_alert(p, "ModelZooResidentDown")
    finally:
        if prometheus is not None:
            prometheus.stop()
        out = resident.stop()
    assert "Traceback" not in out


def loaded_alert(p: Prometheus, name: str) -> bool:
    return any(a["labels"]["alertname"] == name and a["state"] == "firing" for a in p.api("alerts")["alerts"])


def _try(func: Any) -> Any:
    try:
        return func()
    except Exception:  # noqa: BLE001 - Prometheus still starting
        return None


def test_variables_cover_the_dashboard() -> None:
    """Every variable a query uses is one the test expands (else a panel is never checked)."""
    used = set(re.findall(r"\$\w+", DASHBOARD.read_text()))
    defined = {"$" + v["name"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert used <= set(VARIABLES) | defined | {"$__all"}
    assert {name for name in VARIABLES if name != "$__rate_interval"} <= defined
