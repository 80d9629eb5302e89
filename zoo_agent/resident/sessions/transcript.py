"""The session file: one pydantic model for what the resident writes and what it, and
`zoo-agent sessions`, accept back (issues #9, #17).

A session file is input like any other: `sessions import` takes it from a user, and a
file on disk may have been edited or damaged. Before this model, a turn that was not an
object, messages that were not a list or ids outside the vocabulary gave a 500 on every
later request and broke `sessions list` for the whole tenant. Now every reader validates
with ``SessionFile`` and a damaged file is one ``SessionDamaged`` line naming the file and
the JSON pointer. No torch here: the CLI reads sessions without the resident extra.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from zoo_agent.errors import SessionDamaged, SessionError
from zoo_agent.index.schema import pointer

__all__ = ["MAX_SESSION_BYTES", "SESSION_ID", "SessionDamaged", "SessionError", "SessionFile", "SessionMessage", "SessionSummary", "SessionTurn",
           "Text", "read_session", "valid_id"]  # fmt: skip

SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: A transcript is text and token ids; one larger than this is not a conversation.
MAX_SESSION_BYTES = 64 << 20
MAX_SEED = 2**64 - 1  # what torch.manual_seed takes


def _unicode(text: str) -> str:
    """JSON's ``"\\ud800"`` parses to a lone surrogate: not text any tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("unicode", "holds a lone surrogate, which is not Unicode text") from None
    return text


#: A string that is Unicode text (no lone surrogates); the API's fields use it too.
Text = Annotated[str, AfterValidator(_unicode)]
_Strict = ConfigDict(strict=True, extra="forbid")


class SessionMessage(BaseModel):
    model_config = _Strict
    role: Literal["system", "user", "assistant"]
    content: Text


class SessionSampling(BaseModel):
    model_config = _Strict
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: list[Text] | None = None


class SessionTurn(BaseModel):
    """One committed exchange: the request's messages and the reply (last), the reply's own
    token ids (the prompt of the next turn is built from them), and how it was produced."""

    model_config = _Strict
    messages: list[SessionMessage] = Field(min_length=2)
    completion_ids: list[Annotated[int, Field(ge=0)]]
    template: str | None = None
    model: str | None = None
    dropped_turns: int = Field(default=0, ge=0)
    time: str | None = None
    sampling: SessionSampling | None = None
    adapter: str | None = None
    finish_reason: str | None = None
    cache: str | None = None

    @field_validator("messages")
    @classmethod
    def _reply_last(cls, messages: list[SessionMessage]) -> list[SessionMessage]:
        if messages[-1].role != "assistant":
            raise PydanticCustomError("reply", "the last message of a turn is the reply, with role 'assistant'")
        return messages


class SessionSummary(BaseModel):
    """The first ``covers`` turns, summarized by a route's summarizer (issue #21): the prompt of a
    model whose context they no longer fit holds this text instead of them. The turns stay in
    the file (a summary never loses a committed turn); the newest summary is reused."""

    model_config = _Strict
    covers: int = Field(ge=1)
    text: Text
    model: str | None = None  # the summarizer's model@version
    time: str | None = None


class SessionFile(BaseModel):
    model_config = _Strict
    id: Annotated[str, Field(pattern=f"^{SESSION_ID.pattern}$")]
    created: str | None = None
    updated: str | None = None
    turns: list[SessionTurn]
    summaries: list[SessionSummary] = []
    restored_from: Annotated[str, Field(max_length=200)] | None = None  # '<session>/<checkpoint>' it was restored from (issue #36)

    @model_validator(mode="after")
    def _summaries_cover_turns(self) -> SessionFile:
        for summary in self.summaries:
            if summary.covers > len(self.turns):
                raise PydanticCustomError("covers", "a summary covers {covers} turns, but the session has {n}",
                                          {"covers": summary.covers, "n": len(self.turns)})  # fmt: skip
        return self

    def document(self) -> dict[str, Any]:
        """The JSON document: the fields the file had, plus what was set since."""
        return self.model_dump(mode="json", exclude_unset=True)


def valid_id(sid: str) -> str:
    if not SESSION_ID.fullmatch(sid):
        raise SessionError(f"session: {repr(sid[:80])[:100]} is not a session id (letters, digits, '_', '-', '.'; at most 64)")
    return sid


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_session(raw: bytes, file: str, *, vocab_size: int | None = None, model: str | None = None) -> SessionFile:
    """Validate the bytes of a session file; ``vocab_size`` bounds the token ids when known
    (with ``model``, only those of that model's turns: a route session holds other models' too)."""
    if len(raw) > MAX_SESSION_BYTES:
        raise SessionDamaged(file, "", f"larger than {MAX_SESSION_BYTES >> 20} MiB; not a session file")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise SessionDamaged(file, "", f"is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise SessionDamaged(file, "", f"not JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    except (ValueError, RecursionError) as exc:
        raise SessionDamaged(file, "", f"not JSON: {exc or 'nested too deeply'}") from exc
    try:
        session = SessionFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = [p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        raise SessionDamaged(file, pointer(where), first["msg"]) from exc
    if vocab_size is not None:
        for t, turn in enumerate(session.turns):
            if model is not None and (turn.model or "").split("@", 1)[0] != model:
                continue
            for i, token in enumerate(turn.completion_ids):
                if token >= vocab_size:
                    raise SessionDamaged(file, pointer(("turns", t, "completion_ids", i)), f"token id {token} is outside the vocabulary ({vocab_size} ids)")
    return session


def read_session(path: Path, *, vocab_size: int | None = None, model: str | None = None) -> SessionFile:
    """The session in *path*; ``FileNotFoundError`` when there is none, ``SessionDamaged`` when it is no session."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SESSION_BYTES + 1)
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise SessionDamaged(str(path), "", "is a directory, not a session file") from None
    except OSError as exc:
        raise SessionDamaged(str(path), "", f"cannot be read: {exc.strerror or exc}") from exc
    return parse_session(raw, str(path), vocab_size=vocab_size, model=model)
