"""Generated session files, valid and broken: `sessions import` accepts a valid one as it is,
or refuses it with exit 2 and one line naming the file; never a traceback (issue #17)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.support.mutate import mutate
from zoo_agent.cli.main import cli
from zoo_agent.resident.sessions.transcript import SessionDamaged, parse_session

VOCAB = 512
_text = st.text(max_size=20) | st.sampled_from(["\ud800", "x\udfff", "", "\n", "\x00"])
_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user"]), "content": st.text(max_size=30)})
_turn = st.fixed_dictionaries(
    {"messages": st.lists(_message, min_size=1, max_size=3).map(lambda m: [*m, {"role": "assistant", "content": "ok"}]),
     "completion_ids": st.lists(st.integers(0, VOCAB - 1), max_size=6)},
    optional={"template": st.text(max_size=16), "model": st.just("m@v1"), "dropped_turns": st.integers(0, 3), "time": st.just("2025-01-01T00:00:00Z"),
              "sampling": st.fixed_dictionaries({}, optional={"max_tokens": st.integers(1, 99), "temperature": st.floats(0, 2), "seed": st.integers(0, 2**64 - 1)}),
              "adapter": st.none() | st.just("a@1"), "finish_reason": st.sampled_from(["stop", "length"]), "cache": st.just("none")},
)  # fmt: skip
_valid = st.fixed_dictionaries(
    {"id": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True), "turns": st.lists(_turn, max_size=3)},
    optional={"created": st.just("2025-01-01T00:00:00Z"), "updated": st.just("2025-01-02T00:00:00Z")},
)
_junk = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | _text,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3), max_leaves=8)  # fmt: skip


@st.composite
def _broken(draw: st.DrawFn) -> Any:
    """A valid session with a few things replaced, deleted or added anywhere."""
    values = _junk | st.sampled_from([-1, VOCAB, 2**64, True, "5", [], {}, "../x"])
    return mutate(draw, draw(_valid), values, _text | st.sampled_from(["turns", "messages", "completion_ids"]), edits=3)


def _zoo(tmp: Path) -> list[str]:
    """An index with tenant t on model m, and m's current version in the zoo (its vocabulary: 512)."""
    config = json.dumps({"vocab_size": VOCAB}).encode()
    model = {"version": "v1", "source": {"type": "file", "path": "src"}, "license": "MIT",
             "files": [{"path": "config.json", "sha256": hashlib.sha256(config).hexdigest(), "size": len(config)}]}  # fmt: skip
    index = {"models": {"m": model}, "loras": {}, "tenants": {"t": {"model": "m"}}, "hosts": {"h": {"resident": "t"}}}
    (tmp / "index.json").write_text(json.dumps(index))
    version = tmp / "zoo" / "models" / "m" / "versions" / "v1"
    version.mkdir(parents=True)
    (version / "config.json").write_bytes(config)
    (tmp / "zoo" / "models" / "m" / "current").symlink_to("versions/v1")
    return ["--root", str(tmp / "zoo"), "--index", str(tmp / "index.json"), "--host", "h"]


@given(kind=st.sampled_from(["valid", "broken", "bytes"]), data=st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
def test_import_accepts_a_valid_session_or_refuses_it_in_one_line(kind: str, data: st.DataObject) -> None:
    document = data.draw(_valid if kind == "valid" else _broken())
    raw = data.draw(st.binary(max_size=40)) if kind == "bytes" else json.dumps(document).encode()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        args = _zoo(tmp)
        upload = tmp / "upload.json"
        upload.write_bytes(raw)
        if kind == "valid":
            expected: Any = document
        else:  # a mutation may leave it valid: the model decides which answer is right
            try:
                expected = parse_session(raw, str(upload), vocab_size=VOCAB).document()
            except SessionDamaged:
                expected = None
        event(f"{kind}: {'accepted' if expected is not None else 'refused'}")
        result = CliRunner().invoke(cli, ["sessions", "import", *args, "--json", str(upload)])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        if expected is not None:
            assert result.exit_code == 0, result.output + result.stderr
            stored = json.loads((tmp / "zoo/resident/tenants/t/sessions" / f"{expected['id']}.json").read_text())
            assert stored == expected == json.loads(upload.read_text())  # accepted as it is
        else:
            assert result.exit_code == 2, result.output
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"{upload}: "), result.stderr
            assert not (tmp / "zoo/resident").exists()
