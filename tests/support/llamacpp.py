"""llama.cpp for the tests (issue #33): the `llama-server` and `llama-quantize` that .ci/llama-cpp
builds from the pinned llama-cpp-python sdist, its converters, and GGUF models converted from the
tests' tiny transformers model. Nothing is downloaded; without a build the tests are skipped, saying so.

Fixtures (session-scoped, tests/integration/conftest.py):
  ``llama_cpp``  the build (``LlamaCpp``: ``server``, ``quantize_bin``, ``convert_dir``)
  ``tiny_gguf``  {"hf": the tiny transformers model's directory, "f32" / "q8_0" / "q4_k_m": GGUF files}
  ``tiny_gguf_loras``  {"code", "terse": the tests' peft adapters of that model, as GGUF adapters}
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
PIN = REPO / ".ci" / "llama-cpp.txt"
#: Bounded waits: a tiny model converts in seconds and llama-server is ready in about one.
CONVERT_TIMEOUT = 600
READY_TIMEOUT = 60.0
#: The tiny model's tokenizer is a GPT-2 byte-level BPE whose hash the converter does not know;
#: its pre-tokenizer is exactly GPT-2's regex, so declaring "gpt-2" is honest. It has no
#: SentencePiece file, which the converter looks for only after importing sentencepiece (not a
#: dependency here), so that attempt fails as "no file" and the converter goes on to the BPE vocab.
_CONVERT = """
import runpy, sys
convert_dir = sys.argv.pop(1)
sys.path[:0] = [convert_dir, convert_dir + "/gguf-py"]
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sentencepiece = TextModel._set_vocab_sentencepiece
def no_sentencepiece_file(self, *args, **kwargs):  # it imports sentencepiece before looking for the file
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError("no tokenizer.model")
    return sentencepiece(self, *args, **kwargs)
TextModel._set_vocab_sentencepiece = no_sentencepiece_file
sys.argv[0] = convert_dir + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def pinned_version() -> str:
    match = re.search(r"^llama-cpp-python==(\S+)", PIN.read_text(), re.M)
    assert match, f"{PIN}: no llama-cpp-python==VERSION line"
    return match.group(1)


@dataclass(frozen=True)
class LlamaCpp:
    """One build: .ci/llama.cpp-<version>/{bin,convert}."""

    root: Path

    @property
    def server(self) -> Path:
        return self.root / "bin" / "llama-server"

    @property
    def quantize_bin(self) -> Path:
        return self.root / "bin" / "llama-quantize"

    @property
    def convert_dir(self) -> Path:
        return self.root / "convert"

    def convert(self, model_dir: Path, out: Path, outtype: str = "f32") -> Path:
        """convert_hf_to_gguf.py from the same source, on a transformers model directory."""
        _run([sys.executable, "-c", _CONVERT, str(self.convert_dir), str(model_dir), "--outtype", outtype, "--outfile", str(out)])
        return out

    def convert_lora(self, adapter_dir: Path, base_dir: Path, out: Path) -> Path:
        """convert_lora_to_gguf.py from the same source: a peft adapter of the model in ``base_dir`` as a GGUF adapter."""
        _run([sys.executable, str(self.convert_dir / "convert_lora_to_gguf.py"), "--base", str(base_dir), "--outtype", "f32",
              "--outfile", str(out), str(adapter_dir)])  # fmt: skip
        return out

    def quantize(self, src: Path, out: Path, kind: str) -> Path:
        _run([str(self.quantize_bin), str(src), str(out), kind])
        return out


def find_llama_cpp() -> LlamaCpp | None:
    build = LlamaCpp(REPO / ".ci" / f"llama.cpp-{pinned_version()}")
    ok = all(os.access(p, os.X_OK) for p in (build.server, build.quantize_bin)) and (build.convert_dir / "convert_hf_to_gguf.py").is_file()
    return build if ok else None


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CONVERT_TIMEOUT, check=False)
    assert done.returncode == 0, f"{argv[0]} {argv[1:3]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def llama_cpp_or_skip() -> LlamaCpp:
    build = find_llama_cpp()
    if build is None:
        pytest.skip(f"llama.cpp {pinned_version()} is not built (bash .ci/llama-cpp builds it into .ci/llama.cpp-{pinned_version()})")
    return build


def build_tiny_gguf(build: LlamaCpp, where: Path) -> dict[str, Path]:
    """The tiny transformers model and its GGUF conversions: f32, q8_0, q4_k_m."""
    pytest.importorskip("torch", reason="the resident extra is not installed (the converter and the tiny model need torch)")
    from zoo_agent.demo.tiny import build_tiny_model

    hf = build_tiny_model(where / "hf")
    f32 = build.convert(hf, where / "tiny-f32.gguf", "f32")
    return {"hf": hf, "f32": f32, "q8_0": build.quantize(f32, where / "tiny-q8_0.gguf", "q8_0"),
            "q4_k_m": build.quantize(f32, where / "tiny-q4_k_m.gguf", "q4_k_m")}  # fmt: skip


def build_tiny_gguf_loras(build: LlamaCpp, hf: Path, where: Path) -> dict[str, Path]:
    """The tests' peft adapters of the tiny model (``code`` and ``terse``, random non-zero weights, as
    the ``built`` fixture makes them) converted to GGUF adapters: {"code": its .gguf, "terse": ...}; each
    peft directory beside its file, without the suffix."""
    from zoo_agent.demo.tiny import build_tiny_adapter

    out = {}
    for seed, aid in enumerate(("code", "terse"), start=1):
        peft = build_tiny_adapter(hf, where / aid, seed=seed, base_name="m")
        out[aid] = build.convert_lora(peft, hf, where / f"{aid}.gguf")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """`llama-server` on 127.0.0.1 (a free port), no web UI, ready when /health says so."""

    def __init__(self, build: LlamaCpp, model: Path, *extra: str, ctx: int = 512, parallel: int = 1, log: Path | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        argv = [str(build.server), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port), "--ctx-size", str(ctx),
                "--parallel", str(parallel), "--threads", "2", "--no-webui", "--no-warmup", *extra]  # fmt: skip
        self.out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"llama-server exited {self.proc.returncode} (log: {self.log})"
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"llama-server not ready in {timeout} s (log: {self.log})")

    def post(self, path: str, body: dict[str, Any], timeout: float = 120) -> Any:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read(1 << 20))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self.out is not subprocess.DEVNULL:
            self.out.close()  # type: ignore[union-attr]


def serve(build: LlamaCpp, model: Path, *extra: str, log: Path | None = None, **kw: Any) -> Iterator[LlamaServer]:
    """A started, ready server, stopped afterwards (for ``with contextlib.contextmanager(serve)(...)``)."""
    server = LlamaServer(build, model, *extra, log=log, **kw)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def declare_gguf(world: Any, aid: str, version: str, files: dict[str, bytes]) -> None:
    """A GGUF model in ``world``'s index, pinned like every file (``format: "gguf"``)."""
    world.artifact(aid, version, files)
    world.models[aid]["format"] = "gguf"


def declare_gguf_lora(world: Any, aid: str, version: str, files: dict[str, bytes]) -> None:
    """A GGUF adapter of model m in ``world``'s index, pinned like every file (``format: "gguf"``)."""
    world.artifact(aid, version, files, kind="loras")
    world.loras[aid]["format"] = "gguf"


def write_llama_index(world: Any, tenants: dict[str, dict[str, Any]], budget: str | None = None) -> None:
    """``world``'s models and adapters with these tenants (each ``backend: "llama.cpp"`` unless it says otherwise), all on host h."""
    host: dict[str, Any] = {"tenants": list(tenants)}
    if budget is not None:
        host["memory_budget"] = budget
    doc = {"models": world.models, "loras": world.loras, "tenants": {t: {"backend": "llama.cpp", **spec} for t, spec in tenants.items()},
           "hosts": {"h": host}}  # fmt: skip
    world.index.write_text(json.dumps(doc, indent=2))


def with_context_length(src: Path, out: Path, tokens: int) -> Path:
    """A copy of a GGUF file whose header says the model was trained on ``tokens`` of context: it
    loads, and llama-server caps every slot there (a model that loads but cannot generate at 1)."""
    import gguf

    out.write_bytes(src.read_bytes())
    reader = gguf.GGUFReader(out, "r+")
    arch = reader.fields["general.architecture"].contents()
    reader.fields[f"{arch}.context_length"].parts[-1][0] = tokens
    del reader  # the memory map is written back when it goes
    return out
