"""llama.cpp as a tenant's worker, its pure parts (issue #33): the command line a tenant gets, the
binary's version check, the front's refusals and error mapping, and how its log lines are read."""

from __future__ import annotations

import logging
import shutil
import stat
from pathlib import Path

import pytest

from zoo_agent.errors import UsageError
from zoo_agent.resident.config import WorkerConfig
from zoo_agent.resident.engines.front import Request, _dechunk, check, engine_error
from zoo_agent.resident.engines.llamacpp import LlamaServer, find_server, parse_version, server_argv, too_old
from zoo_agent.resident.engines.llamaserver import log_level, telling

#: What the pinned build's --help says of the flags we check (abridged), in its own layout.
HELP = """
-c,    --ctx-size N                     size of the prompt context (default: 0, 0 = loaded from model)
-ctk,  --cache-type-k TYPE              KV cache data type for K
-ctv,  --cache-type-v TYPE              KV cache data type for V
-np,   --parallel N                     number of server slots (default: -1, -1 = auto)
-a,    --alias STRING                   set model name aliases, comma-separated (to be used by API)
--host HOST                             IP addresses to listen on, comma-separated, or UNIX socket paths
--ui,  --webui, --no-ui, --no-webui     whether to enable the Web UI (default: enabled)
--metrics                               enable prometheus compatible metrics endpoint (default: disabled)
--slot-save-path PATH                   path to save slot kv cache (default: disabled)
"""


def test_the_version_line_is_read_in_both_of_its_forms() -> None:
    assert parse_version("version: 4567 (abc1234)\nbuilt with cc for x86_64\n") == ("4567 (abc1234)", 4567)
    assert parse_version("version: 0.5.0-dev (build 1, commit 0c1e570)\nbuilt with GNU 12.2.0") == ("0.5.0-dev (build 1, commit 0c1e570)", 1)
    assert parse_version("llama-server, nothing else") is None


def test_too_old_names_what_is_missing() -> None:
    assert too_old("version: 0.5.0-dev (build 1, commit 0c1e570)", HELP) is None  # a tarball build: its help decides
    assert too_old("version: 6981 (abc)", HELP) is None
    old = too_old("version: 4400 (abc)", HELP.replace("--no-ui, --no-webui", "--no-ui").replace("or UNIX socket paths", ""))
    assert old is not None and "lacks --host PATH.sock (unix sockets), --no-webui" in old and "b5000" in old, old
    assert "older than llama.cpp b5000" in (too_old("version: 4400 (abc)", HELP) or "")
    assert "no 'version:' line" in (too_old("usage: something else", HELP) or "")


def _script(path: Path, text: str) -> Path:
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_server_checks_the_binary_once_and_says_in_one_line_what_is_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cat = shutil.which("cat")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UsageError, match=r"^llama-server is not on PATH; a tenant of this host has backend 'llama.cpp'"):
        find_server("llama-server")
    with pytest.raises(UsageError, match=r"^--llama-server: /nonexistent/llama-server is not an executable file"):
        find_server("/nonexistent/llama-server")
    help_file = tmp_path / "help.txt"
    help_file.write_text(HELP)
    good = _script(tmp_path / "llama-server", f'case "$1" in --version) echo "version: 0.5.0-dev (build 1, commit 0c1e570)";; *) {cat} {help_file};; esac\n')
    assert find_server("llama-server") == LlamaServer(str(good), "0.5.0-dev (build 1, commit 0c1e570)")
    old = _script(tmp_path / "old-server", 'case "$1" in --version) echo "version: 3000 (abc)" >&2;; *) echo "--host HOST  ip address";; esac\n')
    with pytest.raises(UsageError) as caught:
        find_server(str(old))
    assert str(caught.value).startswith(f"--llama-server {old}: version 3000 (abc) lacks --host PATH.sock (unix sockets), --no-webui"), caught.value
    assert "\n" not in str(caught.value)


def test_the_command_line_is_the_tenants_settings(tmp_path: Path) -> None:
    config = WorkerConfig(tenant="chat", model="m", version="v1", version_dir=tmp_path, max_batch=4, max_context=2048, gpu_layers=20,
                          kv_cache_type="q8_0", defaults={"max_tokens": 64, "temperature": 0.0, "top_p": 0.9, "top_k": 0, "seed": None})  # fmt: skip
    argv = server_argv("/bin/llama-server", config, tmp_path / "m.gguf", "/run/x/1-engine.sock", tmp_path / "slots")
    assert argv == [
        "/bin/llama-server", "--model", str(tmp_path / "m.gguf"), "--host", "/run/x/1-engine.sock",
        "--ctx-size", "8192", "--parallel", "4", "--cont-batching",  # max_context for each of max_batch slots
        "--metrics", "--slot-save-path", str(tmp_path / "slots"), "--no-webui", "--no-warmup", "--alias", "chat",
        "--n-gpu-layers", "20", "--cache-type-k", "q8_0", "--cache-type-v", "q8_0", "--min-p", "0", "--repeat-penalty", "1",
        "--n-predict", "64", "--temp", "0.0", "--top-p", "0.9", "--top-k", "0",
    ]  # fmt: skip
    assert "--api-key" not in " ".join(argv) and "--port" not in argv
    plain = server_argv("llama-server", WorkerConfig(tenant="t", model="m", version="v", version_dir=tmp_path, max_batch=1), tmp_path / "m.gguf",
                        "/s.sock", tmp_path)  # fmt: skip
    assert plain[plain.index("--ctx-size") + 1] == "4096" and plain[plain.index("--n-gpu-layers") + 1] == "0"
    assert plain[plain.index("--cache-type-k") + 1] == "f16"


def _post(path: str, body: bytes, **headers: str) -> Request:
    return Request("POST", path, path, headers, body)


@pytest.mark.parametrize(("request_", "status", "param"), [
    (_post("/v1/chat/completions", b'{"model": "t", "messages": [{"role": "user", "content": "x"}]}'), None, None),
    (_post("/v1/completions", b'{"model": "m", "prompt": "x"}'), None, None),  # the model's id names it too
    (_post("/v1/completions", b'{"model": "t:sql", "prompt": "x"}'), 404, "model"),  # no adapter: never the base model's answer instead
    (_post("/v1/completions", b'{"model": "other", "prompt": "x"}'), 404, "model"),
    (_post("/v1/completions", b'{"prompt": "x"}'), 400, "model"),
    (_post("/v1/completions", b'[1]'), 400, "body"),
    (_post("/v1/completions", b'{"model": "t", "prompt": "x", "a": ' + b"[" * 100 + b"]" * 100 + b"}"), 400, "body"),
    (_post("/v1/chat/completions", b'{"model": "t", "session": "s1", "messages": [{"role": "user", "content": "x"}]}'), 400, "session"),  # it would answer without the conversation
    (_post("/v1/chat/completions", b'{"model": "t", "messages": [{"role": "user", "content": "x"}]}', **{"x-zoo-session-route": "r"}), 400, "session"),
    (Request("GET", "/v1/sessions/s1", "/v1/sessions/s1?model=t"), 404, "session"),
    (_post("/v1/load_lora_adapter", b'{"lora_name": "t"}'), 400, "lora_name"),
    (Request("GET", "/metrics", "/metrics"), None, None),
    (Request("GET", "/slots", "/slots"), 404, None),  # its own endpoints are not ours to expose
    (Request("POST", "/slots/0", "/slots/0?action=save"), 404, None),
    (Request("GET", "/props", "/props"), 404, None),
])  # fmt: skip
def test_the_front_refuses_what_llama_server_would_misserve(request_: Request, status: int | None, param: str | None) -> None:
    refused = check(request_, ("t", "m"))
    assert (refused.status, refused.param) == (status, param) if refused is not None else status is None, refused and refused.document()


def test_llama_servers_errors_are_ours() -> None:
    body = b'{"error":{"code":400,"message":"request (903 tokens) exceeds the available context size (256 tokens), try increasing it",' \
           b'"type":"exceed_context_size_error","n_prompt_tokens":903,"n_ctx":256}}'  # fmt: skip
    error = engine_error(400, body, "messages")
    assert error.document() == {"error": {"message": "messages: 903 tokens do not fit the context of 256 tokens", "type": "invalid_request_error",
                                          "param": "messages", "code": "context_length_exceeded"}}  # fmt: skip
    other = engine_error(500, b'{"error":{"code":500,"message":"the\\nmodel   failed","type":"server_error"}}', "prompt")
    assert (other.status, other.message, other.kind, other.code) == (500, "the model failed", "server_error", "server_error")
    assert engine_error(503, b"<html>busy</html>", "prompt").message == "llama-server answered 503: <html>busy</html>"
    assert engine_error(200, b"not json", "prompt").status == 502


def test_a_chunked_error_body_is_read_whole_or_as_far_as_it_came() -> None:
    assert _dechunk(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n") == b"hello world"
    assert _dechunk(b"5;ext=1\r\nhello\r\nzz\r\n") == b"hello"


def test_its_log_lines_are_read_at_their_level() -> None:
    assert log_level("0.00.008.486 W srv  llama_server: security: no API key is set") == (logging.INFO, "srv  llama_server: security: no API key is set")
    assert log_level("0.03.020.777 I slot get_availabl: id  1 | task -1") == (logging.DEBUG, "slot get_availabl: id  1 | task -1")
    assert log_level("0.00.004.593 E llama_model_load: error loading model: x", loading=True)[0] == logging.ERROR
    assert log_level("0.02.011.275 E srv    send_error: task id = 0, error: request (2 tokens) exceeds")[0] == logging.WARNING  # a client's error
    assert log_level("ggml.c:123: GGML_ASSERT(x) failed") == (logging.INFO, "ggml.c:123: GGML_ASSERT(x) failed")
    lines = ["0.00.004.425 E llama_model_load_from_file_impl: failed to load model",
             "0.00.004.593 E llama_model_load: error loading model: tensor 'blk.0.attn_k.weight' data is not within the file bounds",
             "0.00.004.675 E srv    load_model: failed to load model, 'cut.gguf'", "0.00.004.701 I srv    operator(): cleaning up before exit...",
             "0.00.004.932 E srv  llama_server: exiting due to model loading error"]  # fmt: skip
    assert telling(lines) == "llama_model_load: error loading model: tensor 'blk.0.attn_k.weight' data is not within the file bounds"
    assert telling(lines[2:]) == "srv  llama_server: exiting due to model loading error"
    assert telling([]) == "(no output)"


@pytest.mark.parametrize(("body", "param", "chat"), [
    (b'{"model": "t", "prompt": ["a", "b"]}', "prompt", False),  # a list of prompts: a task each, past the router's admission
    (b'{"model": "t", "prompt": "a", "n": 4}', "n", False),
    (b'{"model": "t", "prompt": "a", "n_cmpl": 4}', "n_cmpl", False),
    (b'{"model": "t", "prompt": "a", "max_tokens": "5"}', "max_tokens", False),
    (b'{"model": "t", "prompt": "a", "stop": ["1", "2", "3", "4", "5"]}', "stop", False),
    (b'{"model": "t", "messages": [{"role": "tool", "content": "x"}]}', "messages.0.role", True),
    (b'{"model": "t", "messages": []}', "messages", True),
    (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "model", True),
])  # fmt: skip
def test_a_body_our_api_refuses_is_refused_as_any_tenant_refuses_it(body: bytes, param: str, chat: bool) -> None:
    refused = check(_post("/v1/chat/completions" if chat else "/v1/completions", body), ("t", "m"))
    assert refused is not None and (refused.status, refused.param) == (400, param), refused and refused.document()
    assert refused.message.startswith(f"{param}: ")


def test_a_worker_with_no_process_is_placed_in_no_cgroup(tmp_path: Path) -> None:
    """pid 0 (a worker whose start failed before it had a process): written to cgroup.procs, 0 would move the supervisor itself."""
    from zoo_agent.resident.cgroups import WorkerCgroups

    unit = tmp_path / "cgroup" / "system.slice" / "model-zoo-resident.service"
    unit.mkdir(parents=True)
    for where in (tmp_path / "cgroup", unit):
        (where / "cgroup.controllers").write_text("memory\n")
    (unit / "cgroup.subtree_control").write_text("")
    (tmp_path / "self-cgroup").write_text("0::/system.slice/model-zoo-resident.service\n")
    cgroups = WorkerCgroups.detect(tmp_path / "cgroup", tmp_path / "self-cgroup", delegated=lambda _: True)
    assert cgroups.unit == unit
    assert cgroups.place(0, "chat", 1 << 30) is None
    assert not list(unit.glob("worker-*"))


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_answer_the_router_had_whole_is_counted_though_it_closed_before_the_engine(tmp_path: Path, framing: str) -> None:
    """The router closes its connection as soon as it has the whole answer, often before llama-server's
    own end arrives: that is no client gone. The front counted it as one (Status: said 56 of 60)."""
    import socket
    import threading
    import time

    from zoo_agent.resident.engines.front import Front

    engine_path, front_path = str(tmp_path / "engine.sock"), str(tmp_path / "front.sock")
    engine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    engine.bind(engine_path)
    engine.listen(1)
    answer = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}" if framing == "content-length"
              else b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")  # fmt: skip
    let_go = threading.Event()

    def serve() -> None:  # answers whole, then holds its end of the connection until the router has closed
        conn, _ = engine.accept()
        with conn:
            conn.settimeout(10)
            conn.recv(65536)
            conn.sendall(answer)
            let_go.wait(10)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    front = Front(front_path, engine_path, ("t",))
    front.start()
    try:
        body = b'{"model": "t", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as router:
            router.settimeout(10)
            router.connect(front_path)
            router.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
            got = b""
            while not got.endswith(answer.split(b"\r\n\r\n", 1)[1]):
                data = router.recv(65536)
                assert data, got
                got += data
        deadline = time.monotonic() + 10  # a liveness bound: the front's thread sees the close at once
        while front.served == 0 and front.inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        let_go.set()
        server.join(10)
        deadline = time.monotonic() + 10
        while front.inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (front.served, front.inflight) == (1, 0)
    finally:
        let_go.set()
        front.stop()
        engine.close()
