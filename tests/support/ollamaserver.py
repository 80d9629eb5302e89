"""A stand-in for the Ollama daemon, for tests only: no Ollama server can be installed here.

It is NOT Ollama. It speaks the subset of Ollama's REST API (as documented for Ollama
0.6, docs/api.md; reported as version 0.6.5) that zoo-agent and the official `ollama`
Python client use, with the same shapes: `GET /api/version`, `POST /api/pull` (NDJSON
progress: pulling manifest, per-layer digest/total/completed, verifying, writing manifest,
success), `GET /api/tags`, `POST /api/show`, `GET /api/ps`, `POST /api/generate` and
`POST /api/chat` (NDJSON when streaming; `keep_alive`, `options.num_predict`; an empty
prompt with `keep_alive` only loads the model). Generation is a deterministic word
sequence derived from the prompt: the tests check the plumbing, not language.

Faults to inject (`server.faults`): `digest` (tags report another digest than the
registry's), `stall_pull` (a pull stops sending mid-stream), `too_old` (pull answers like
an old daemon for a newer model), and `stop()` for a daemon that went away (`restarted()`
brings it back at the same address, with the models it had pulled and none loaded).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

VERSION = "0.6.5"
WORDS = "the zoo keeps every model pinned by digest and serves one tenant at a time".split()


class OllamaStandIn(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, registry: dict[str, bytes], port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        # name:tag -> the manifest bytes; its sha256 is the digest Ollama reports
        self.registry = {name: {"manifest": data, "digest": hashlib.sha256(data).hexdigest(), "size": 1000 + len(data)} for name, data in registry.items()}
        self.local: dict[str, dict[str, Any]] = {}  # pulled models
        self.loaded: dict[str, datetime | None] = {}  # model -> expiry (None: forever)
        self.faults: dict[str, Any] = {}
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.generating = self.most_generating = 0  # generations in flight now, and the most at once
        self.placeholder: socket.socket | None = None  # the port, held while stopped
        self.connections: set[socket.socket] = set()  # open client connections (a stop closes them)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> OllamaStandIn:
        self.thread.start()
        return self

    def stop(self, keep_port: bool = False) -> None:
        """The daemon goes away: connections are refused. ``keep_port``: its port stays bound (not
        listening) until ``restarted()``, so no other process on a busy machine takes it and answers
        in its place meanwhile."""
        self.shutdown()
        self.server_close()
        with self.lock:
            open_connections = list(self.connections)
        for connection in open_connections:  # a daemon that stops closes its keep-alive connections too
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if keep_port and self.placeholder is None:
            self.placeholder = socket.socket()
            self.placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.placeholder.bind(self.server_address)
        elif not keep_port and self.placeholder is not None:
            self.placeholder.close()
            self.placeholder = None

    def restarted(self) -> OllamaStandIn:
        """The daemon started again after ``stop()``: the same address, the models it had pulled (its
        store is on disk), none loaded, one request log."""
        if self.placeholder is not None:
            self.placeholder.close()
            self.placeholder = None
        again = OllamaStandIn({}, port=self.server_address[1])
        again.registry, again.local, again.requests, again.faults = self.registry, self.local, self.requests, self.faults
        return again.start()

    @staticmethod
    def digest_of(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class _Handler(BaseHTTPRequestHandler):
    server: OllamaStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _body(self) -> dict[str, Any]:
        n = int(self.headers.get("content-length") or 0)
        data = json.loads(self.rfile.read(n) or b"{}") if n else {}
        self.server.requests.append((self.command, self.path, data))
        return data

    def _json(self, status: int, doc: Any) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _ndjson_start(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/x-ndjson")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

    def _line(self, doc: Any) -> None:
        data = (json.dumps(doc) + "\n").encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _name(self, body: dict[str, Any]) -> str:
        name = str(body.get("model") or body.get("name") or "")
        return name if ":" in name else f"{name}:latest"

    def do_GET(self) -> None:
        self._body()
        s = self.server
        if self.path == "/api/version":
            self._json(200, {"version": VERSION})
        elif self.path == "/api/tags":
            digest = s.faults.get("digest")
            self._json(200, {"models": [{"name": n, "model": n, "modified_at": m["modified_at"], "size": m["size"], "digest": digest or m["digest"],
                                         "details": {"format": "gguf", "family": "llama", "parameter_size": "1B", "quantization_level": "Q4_0"}}
                                        for n, m in s.local.items()]})  # fmt: skip
        elif self.path == "/api/ps":
            far = (datetime.now(UTC) + timedelta(days=3650)).isoformat()
            self._json(200, {"models": [{"name": n, "model": n, "size": s.local[n]["size"], "digest": s.local[n]["digest"],
                                         "expires_at": (e.isoformat() if e else far), "size_vram": 0, "details": {}}
                                        for n, e in s.loaded.items() if n in s.local and (e is None or e > datetime.now(UTC))]})  # fmt: skip
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = self._body()
        s = self.server
        name = self._name(body)
        if self.path == "/api/pull":
            if name not in s.registry:
                self._json(404, {"error": "pull model manifest: file does not exist"})
                return
            if s.faults.get("too_old"):
                self._json(412, {"error": "pull model manifest: 412: this model requires a newer version of Ollama"})
                return
            entry = s.registry[name]
            self._ndjson_start()
            self._line({"status": "pulling manifest"})
            layer = "sha256:" + entry["digest"]
            for done in range(0, entry["size"] + 1, max(1, entry["size"] // 4)):
                if s.faults.get("stall_pull") and done > 0:
                    time.sleep(s.faults["stall_pull"])  # longer than the client's read timeout
                    return
                self._line({"status": f"pulling {entry['digest'][:12]}", "digest": layer, "total": entry["size"], "completed": done})
            for status in ("verifying sha256 digest", "writing manifest", "success"):
                self._line({"status": status})
            self._end()
            s.local[name] = {**entry, "modified_at": _now()}
        elif self.path == "/api/show":
            if name not in s.local:
                self._json(404, {"error": f"model '{name}' not found"})
                return
            self._json(200, {"modelfile": f"FROM {name}", "parameters": "", "template": "{{ .Prompt }}", "modified_at": s.local[name]["modified_at"],
                             "details": {"format": "gguf", "family": "llama"}, "model_info": {"general.architecture": "llama"}})  # fmt: skip
        elif self.path in ("/api/generate", "/api/chat"):
            self._generate(name, body, chat=self.path == "/api/chat")
        else:
            self._json(404, {"error": "not found"})

    def _generate(self, name: str, body: dict[str, Any], *, chat: bool) -> None:
        s = self.server
        if name not in s.local:
            self._json(404, {"error": f"model '{name}' not found, try pulling it first"})
            return
        keep = body.get("keep_alive", "5m")
        expiry = None if isinstance(keep, int | float) and keep < 0 else datetime.now(UTC) + timedelta(minutes=5)
        s.loaded[name] = expiry
        prompt = json.dumps(body.get("messages")) if chat else str(body.get("prompt", ""))
        if not chat and not prompt:  # load only
            self._json(200, {"model": name, "created_at": _now(), "response": "", "done": True, "done_reason": "load"})
            return
        n = int((body.get("options") or {}).get("num_predict") or 8)
        seed = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
        words = [WORDS[(seed >> (4 * i)) % len(WORDS)] + " " for i in range(n)]
        final = {"model": name, "created_at": _now(), "done": True, "done_reason": "length", "total_duration": 1000,
                 "prompt_eval_count": max(1, len(prompt) // 4), "eval_count": n}  # fmt: skip
        with s.lock:
            s.generating += 1
            s.most_generating = max(s.most_generating, s.generating)
        try:
            if body.get("stream", True):
                self._ndjson_start()
                for w in words:
                    time.sleep(s.faults.get("word_seconds", 0))  # a daemon that takes its time per token
                    self._line({"model": name, "created_at": _now(), **({"message": {"role": "assistant", "content": w}} if chat else {"response": w}), "done": False})
                self._line({**final, **({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})})
                self._end()
            else:
                time.sleep(s.faults.get("word_seconds", 0) * n)
                text = "".join(words)
                self._json(200, {**final, **({"message": {"role": "assistant", "content": text}} if chat else {"response": text})})
        finally:
            with s.lock:
                s.generating -= 1
