"""The resident under test: real processes, a notify socket bound by the test, the real
openai client, a tiny model built by a fixture and published with apply (issue #5)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.notify import Notify
from tests.support.resident import Resident, free_port
from tests.support.world import World

pytest.importorskip("torch", reason="the resident extra is not installed (pip install -e .[resident])")

pytestmark = pytest.mark.resident


@pytest.fixture
def resident_world(world: World, tiny: dict[str, bytes]) -> World:
    world.artifact("m", "v1", tiny)
    world.tenant = {"generation": {"temperature": 0, "max_tokens": 16}}
    world.write_index()
    assert world.run("apply").exit_code == 0
    return world


@pytest.fixture
def resident(resident_world: World) -> Iterator[Resident]:
    r = Resident(resident_world, env={"WATCHDOG_USEC": "2000000"})
    try:
        r.notify.wait(lambda m: "READY" in m)
        yield r
    finally:
        r.stop()


def _client(r: Resident, **kw: object) -> object:
    from openai import OpenAI

    return OpenAI(base_url=r.url + "/v1", api_key=str(kw.get("api_key", "none")), max_retries=0, timeout=60)


def test_ready_only_after_a_real_generation_and_the_api_answers(resident: Resident) -> None:
    keys = resident.notify.keys()
    assert keys.index("EXTEND_TIMEOUT_USEC") < keys.index("READY")
    ready = resident.notify.wait(lambda m: "READY" in m)
    assert ready["STATUS"].startswith("1 tenant: t m@v1")
    import httpx

    health = httpx.get(resident.url + "/health").json()
    assert health["state"] == "ready" and health["status"].startswith("1 tenant: t m@v1")
    assert {k: health["tenants"]["t"][k] for k in ("state", "model", "version", "pinned")} == {"state": "serving", "model": "m", "version": "v1", "pinned": False}
    client = _client(resident)
    assert [m.id for m in client.models.list()] == ["t"]  # type: ignore[attr-defined]
    answer = client.chat.completions.create(model="t", messages=[{"role": "user", "content": "Hello"}], max_tokens=6)  # type: ignore[attr-defined]
    assert answer.choices[0].message.content and answer.usage.completion_tokens == 6
    assert answer.system_fingerprint == "m@v1"
    streamed = "".join((c.choices[0].delta.content or "") for c in client.chat.completions.create(  # type: ignore[attr-defined]
        model="t", messages=[{"role": "user", "content": "Hello"}], max_tokens=6, stream=True))
    assert streamed == answer.choices[0].message.content  # greedy: the same tokens either way
    text = client.completions.create(model="t", prompt="The zoo", max_tokens=4)  # type: ignore[attr-defined]
    assert text.choices[0].text is not None
    metrics = httpx.get(resident.url + "/metrics").text
    assert 'zoo:generation_tokens_total{tenant="t"} 16.0' in metrics and 'zoo:time_to_first_token_seconds_count{tenant="t"} 3.0' in metrics
    resident.notify.wait(lambda m: "WATCHDOG" in m, after=len(resident.notify.messages))  # fed while serving


def test_bad_requests_name_the_field(resident: Resident) -> None:
    import httpx

    cases = [
        ({"model": "t", "messages": [{"role": "user", "content": "x"}], "temperature": 9}, 400, "temperature"),
        ({"model": "t", "messages": []}, 400, "messages"),
        ({"model": "t", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, 400, "max_tokens"),
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ]
    for body, status, param in cases:
        r = httpx.post(resident.url + "/v1/chat/completions", json=body)
        assert r.status_code == status, r.text
        assert r.json()["error"]["param"] == param
    big = httpx.post(resident.url + "/v1/completions", content=b"{" + b" " * (2 << 20) + b"}", headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["param"] == "body"


def test_sigterm_stops_cleanly(resident: Resident) -> None:
    resident.proc.send_signal(signal.SIGTERM)
    assert resident.proc.wait(timeout=60) == 0
    assert "STOPPING" in resident.notify.keys()


def test_weights_that_cannot_load_never_send_ready(world: World, tiny: dict[str, bytes]) -> None:
    files = dict(tiny)
    files["model.safetensors"] = b"\xff" * 64  # a corrupt header, pinned as such: verification passes, loading cannot
    world.artifact("m", "v1", files)
    assert world.run("apply").exit_code == 0
    r = Resident(world)
    out = r.stop() if r.proc.wait(timeout=120) is not None else ""
    assert r.proc.returncode == 1
    keys = r.notify.keys()
    assert "READY" not in keys
    failed = r.notify.wait(lambda m: "ERRNO" in m, timeout=1)
    assert failed["STATUS"].startswith("cannot load m@v1: ")
    assert "Traceback" not in out


def test_killed_worker_is_replaced(resident: Resident) -> None:
    before = len(resident.notify.messages)
    old = resident.worker_pid()
    os.kill(old, signal.SIGKILL)
    resident.notify.wait(lambda m: "READY" in m, after=before)
    assert resident.worker_pid() != old
    answer = _client(resident).completions.create(model="t", prompt="Hi", max_tokens=2)  # type: ignore[attr-defined]
    assert answer.usage.completion_tokens == 2


def test_hung_worker_stops_the_watchdog_and_is_replaced(resident: Resident) -> None:
    old = resident.worker_pid()
    os.kill(old, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        before = len(resident.notify.messages)
        resident.notify.wait(lambda m: "READY" in m, after=before, timeout=90)
    finally:
        try:
            os.kill(old, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert resident.worker_pid() != old
    # No WATCHDOG=1 while nothing makes progress: after the grace of two intervals (2 s here)
    # following the last answered ping, none until the supervisor has noticed and acted.
    noticed = min(t for t, m in resident.notify.messages if t > stopped and "worker died" in m.get("STATUS", ""))
    assert noticed - stopped > 4  # noticed by the missing pong (ping_timeout 5 s), not by a timer
    assert [t for t, m in resident.notify.messages if "WATCHDOG" in m and stopped + 2.1 < t < noticed] == []


def test_hot_swap_under_load_fails_no_request(resident_world: World, resident: Resident, tiny: dict[str, bytes]) -> None:
    import httpx

    results: dict[int, list[str]] = {}
    failures: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        answers = results.setdefault(n, [])
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                try:
                    with http.stream("POST", resident.url + "/v1/chat/completions", json={
                        "model": "t", "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]}) as r:
                        if r.status_code != 200:
                            failures.append(f"HTTP {r.status_code}")
                            continue
                        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                    assert lines[-1] == "data: [DONE]"
                    answers.append(json.loads(lines[1].removeprefix("data: "))["system_fingerprint"])
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        resident_world.artifact("m", "v2", {**tiny, "config.json": tiny["config.json"].replace(b"{", b'{"_v": 2,', 1)})
        assert resident_world.run("apply").exit_code == 0  # current moves; the resident follows it
        resident.notify.wait(lambda m: m.get("STATUS", "").startswith("1 tenant: t m@v2") and "READY" in m, timeout=90)
        deadline = time.monotonic() + 60  # bounded: until every client has been answered by v2
        while time.monotonic() < deadline and not all(a and a[-1] == "m@v2" for a in results.values()):
            time.sleep(0.1)
    finally:  # the clients stop whatever happened above
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert failures == []
    # Each client: answers from v1, then from v2 only (once the old worker stops accepting,
    # a reconnecting client reaches the new one), never back; and every client got there.
    for answers in results.values():
        assert answers and answers[-1] == "m@v2", answers
        assert "m@v1" not in answers[answers.index("m@v2"):], answers
    assert any("m@v1" in answers for answers in results.values())
    assert "RELOADING" in resident.notify.keys()
    assert 'zoo:reloads_total{result="ok",tenant="t"} 1.0' in httpx.get(resident.url + "/metrics").text


def test_listening_beyond_loopback_needs_a_token(resident_world: World) -> None:
    result = resident_world.run("resident", "--listen", "0.0.0.0:8999")
    assert result.exit_code == 2
    assert "listening beyond loopback needs a bearer token (--api-key-file)" in result.stderr


def test_bearer_token(resident_world: World) -> None:
    import httpx

    key = resident_world.tmp / "api-key"
    key.write_text("k3y\n")
    r = Resident(resident_world, "--api-key-file", str(key))
    try:
        r.notify.wait(lambda m: "READY" in m)
        assert httpx.get(r.url + "/v1/models").status_code == 401
        assert httpx.get(r.url + "/v1/models", headers={"Authorization": "Bearer k3y"}).status_code == 200
        assert httpx.get(r.url + "/health").status_code == 200
    finally:
        r.stop()


@pytest.mark.parametrize(("max_batch", "clients", "refused"), [(2, 8, True), (8, 6, False)])
def test_429_with_retry_after_only_when_batch_and_queue_are_full(resident_world: World, max_batch: int, clients: int, refused: bool) -> None:
    """max_batch decoding plus max_queue waiting (1 here) are accepted; beyond both, 429."""
    import httpx

    resident_world.tenant = {"generation": {"temperature": 0, "max_tokens": 16}, "resources": {"max_queue": 1, "max_batch": max_batch}}
    resident_world.write_index()
    r = Resident(resident_world)
    try:
        r.notify.wait(lambda m: "READY" in m)
        statuses: list[tuple[int, str | None]] = []
        go = threading.Barrier(clients)

        def ask() -> None:
            go.wait()
            resp = httpx.post(r.url + "/v1/completions", json={"model": "t", "prompt": "Hello", "max_tokens": 120, "ignore_eos": True}, timeout=120)
            statuses.append((resp.status_code, resp.headers.get("retry-after")))

        threads = [threading.Thread(target=ask) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert {code for code, _ in statuses} <= {200, 429}
        if refused:
            assert (429, "1") in statuses and any(code == 200 for code, _ in statuses)
            assert sum(code == 200 for code, _ in statuses) >= max_batch + 1  # the batch and the queue behind it
        else:
            assert [code for code, _ in statuses] == [200] * clients
    finally:
        r.stop()


def test_unix_socket_listener(resident_world: World) -> None:
    import httpx

    path = resident_world.tmp / "resident.sock"
    port = free_port()
    notify = Notify(resident_world.tmp / "n.sock")
    proc = subprocess.Popen([sys.executable, "-m", "zoo_agent", "resident", *resident_world.args("--listen", f"unix:{path}")],
                            env={**os.environ, "NOTIFY_SOCKET": str(notify.path)}, cwd=resident_world.tmp)  # fmt: skip
    try:
        notify.wait(lambda m: "READY" in m)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path))) as http:
            assert http.get(f"http://localhost:{port}/health").json()["state"] == "ready"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        notify.sock.close()


def test_stop_first_reload_holds_requests_in_the_gap(resident_world: World, tiny: dict[str, bytes]) -> None:
    """Two versions do not fit: the old one stops first; requests in the gap wait in the router
    for the new one instead of failing (issue #20; before the router they got 503 + Retry-After)."""
    import httpx

    resident_world.tenant = {"generation": {"temperature": 0, "max_tokens": 16}, "resources": {"memory_max": "1M"}}
    resident_world.write_index()
    r = Resident(resident_world)
    try:
        r.notify.wait(lambda m: "READY" in m)
        files = dict(tiny)
        files["config.json"] = tiny["config.json"].replace(b"{", b'{"_v": 3,', 1)
        resident_world.artifact("m", "v3", files)
        assert resident_world.run("apply").exit_code == 0
        answered: list[tuple[int, str]] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            resp = httpx.post(r.url + "/v1/completions", json={"model": "t", "prompt": "Hi", "max_tokens": 2}, timeout=60)
            answered.append((resp.status_code, resp.json().get("system_fingerprint", "")))
            if answered[-1] == (200, "m@v3"):
                break
        assert answered[-1] == (200, "m@v3")
        assert {code for code, _ in answered} == {200}, answered  # nobody saw the gap
        lease = json.loads((resident_world.root / "resident/tenants/t/lease.json").read_text())
        assert lease["swaps"][-1]["reason"] == "reload (stop first)" and lease["swaps"][-1]["to"] == "v3"
    finally:
        r.stop()


@pytest.mark.skipif(not Path("/usr/bin/systemd-socket-activate").exists(), reason="systemd-socket-activate is not installed")
def test_socket_activation(resident_world: World) -> None:
    import httpx

    port = free_port()
    notify = Notify(resident_world.tmp / "sa.sock")
    proc = subprocess.Popen(["/usr/bin/systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-E", f"NOTIFY_SOCKET={notify.path}",
                             sys.executable, "-m", "zoo_agent", "resident",
                             *resident_world.args("--listen", "127.0.0.1:1")],  # ignored: systemd's socket wins
                            env={**os.environ, "NOTIFY_SOCKET": str(notify.path)}, cwd=resident_world.tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:  # the first connection starts the service, as systemd would
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5):
                    break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "systemd-socket-activate never listened"
                time.sleep(0.1)
        notify.wait(lambda m: "READY" in m)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json()["state"] == "ready"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        notify.sock.close()


@pytest.mark.parametrize("damage", ["stale", "tampered"])
def test_strict_refuses_to_serve_anything_but_the_declared_verified_version(resident_world: World, tiny: dict[str, bytes], damage: str) -> None:
    if damage == "stale":  # the index moved on, apply has not run yet
        resident_world.artifact("m", "v2", {**tiny, "config.json": tiny["config.json"] + b" "})
        expected = "cannot start: strict: model m is at v1, the index declares v2; run: zoo-agent apply"
    else:
        target = resident_world.root / "models/m/versions/v1/config.json"
        target.chmod(0o644)
        target.write_bytes(target.read_bytes() + b" ")
        expected = f"cannot start: strict: {target}: expected sha256 "
    r = Resident(resident_world, "--strict")
    code = r.proc.wait(timeout=60)
    out = r.stop()
    assert code != 0, out
    failed = r.notify.wait(lambda m: "ERRNO" in m)
    assert failed["STATUS"].startswith(expected), failed
