"""The request bodies and headers a worker's app takes (issues #5, #17, #20), and how a body
is read: with the one bounded JSON reader (issue #31)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import Header, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from zoo_agent.jsonbound import JSONRefused, loads
from zoo_agent.resident.sessions.transcript import MAX_SEED, Text
from zoo_agent.resident.wire.headers import PRIORITY as HEADER
from zoo_agent.resident.wire.headers import SESSION_ROUTE as ROUTE_HEADER
from zoo_agent.resident.wire.priority import CLASSES, MAX_PRIORITY, MIN_PRIORITY
from zoo_agent.resident.worker.adapter_sets import MAX_SCALE, SCALE_STEP, on_step

__all__ = ["MAX_ASKED", "MAX_MESSAGES", "MAX_STOP_CHARS", "Body", "BoundedRoute", "ChatBody", "CompletionBody", "LoadLoraBody", "Message", "PriorityHeader",
           "RouteHeader", "ScaledAdapter", "StopText", "StreamOptions", "XZoo"]

MAX_STOP_CHARS = 256
#: More messages than any conversation holds (a 1 MiB body of ``{"role": "user", "content": ""}``
#: is ~30,000): checked before a single item is validated, because validating and reporting
#: half a million bad items took the worker past its ping timeout (issue #31).
MAX_MESSAGES = 10_000


StopText = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]

#: The index's largest ``resources.max_loras``: no set is longer. Checked before an item is
#: validated, as ``messages`` is (a 1 MiB body holds 300,000 ``{}``).
MAX_ASKED = 1024


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = Field(default=False, description="OpenAI's: a last chunk, with no choices, carries the usage.")


def _at_most(items: Any) -> Any:
    if isinstance(items, list) and len(items) > MAX_ASKED:
        raise PydanticCustomError("too_long", "at most {limit} items, not {given}", {"limit": MAX_ASKED, "given": len(items)})
    return items


class ScaledAdapter(BaseModel):
    """One adapter of an explicit set (issue #36)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    name: Text = Field(description="An adapter id the index declares for the tenant.")
    scale: float = Field(default=1.0, ge=-MAX_SCALE, le=MAX_SCALE,
                         description=f"Multiplies the adapter's delta: -{MAX_SCALE:g} to {MAX_SCALE:g} in steps of {SCALE_STEP:g}, not 0.")  # fmt: skip

    @field_validator("scale")
    @classmethod
    def _on_step(cls, scale: float) -> float:
        steps = on_step(scale)
        if steps is None or steps == 0:
            why = "adds nothing; leave the adapter out" if steps == 0 else f"is not a multiple of {SCALE_STEP:g}"
            raise PydanticCustomError("scale", f"{scale:g} {why} (scales run from -{MAX_SCALE:g} to {MAX_SCALE:g} in steps of {SCALE_STEP:g}, not 0)")
        return steps


class XZoo(BaseModel):
    """Our extension's request fields: which adapters answer (issue #36). An unknown field is a 400: a typo must not go unnoticed."""

    model_config = ConfigDict(strict=True, extra="forbid")
    adapters: list[ScaledAdapter] | None = Field(default=None, min_length=1, description="Compose these adapters at these scales; model names the tenant.")
    exclude: list[Text] = Field(default_factory=list, description="Adapters never used: '<tenant>:auto' does not choose them, a set may not name them.")

    _bounded = field_validator("adapters", "exclude", mode="before")(_at_most)


class Body(BaseModel):
    """Strict types (``max_tokens: true`` or ``"5"`` is a 400 naming the field, never a guess), text
    that is Unicode (a lone surrogate made a 500), a seed torch can take (2^64 made a 500) (issue #17)."""

    model_config = ConfigDict(extra="allow", strict=True)  # OpenAI clients send fields we ignore
    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = Field(
        default=None, description="Up to 4 sequences: the text ends before the first one generated, finish_reason 'stop'.")
    n: int = Field(default=1, description="Completions per request; only 1 is supported.")
    ignore_eos: bool = Field(default=False, description="vLLM's extension: keep generating past end-of-sequence up to max_tokens.")
    priority: int | None = Field(default=None, ge=MIN_PRIORITY, le=MAX_PRIORITY,
                                 description=f"vLLM's: lower is served first ({', '.join(f'{k} {v}' for k, v in CLASSES.items())}); "
                                             f"the {HEADER} header wins over it; default: the tenant's.")  # fmt: skip
    x_zoo: XZoo | None = Field(default=None, description="Our extension: adapters composed or excluded (issue #36).")

    @field_validator("n")
    @classmethod
    def _one(cls, n: int) -> int:
        if n != 1:
            raise PydanticCustomError("n", "only n=1 is supported; send the request again for another completion")
        return n

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class Message(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    session: Text | None = Field(default=None, description="Our extension: append this exchange to a session (created on first use).")

    @field_validator("messages", mode="before")
    @classmethod
    def _bounded(cls, messages: Any) -> Any:
        if isinstance(messages, list) and len(messages) > MAX_MESSAGES:
            raise PydanticCustomError("too_long", "at most {limit} messages, not {given}", {"limit": MAX_MESSAGES, "given": len(messages)})
        return messages


class CompletionBody(Body):
    prompt: Text


#: Parsed by parse_priority, not by FastAPI, so that a bad value's 400 names the header and the allowed classes.
PriorityHeader = Annotated[str | None, Header(alias=HEADER, description=f"The request's class: {', '.join(CLASSES)} (issue #20).")]
RouteHeader = Annotated[str | None, Header(alias=ROUTE_HEADER, include_in_schema=False)]


class LoadLoraBody(BaseModel):
    """vLLM's body; ``lora_name`` must be an adapter id declared for this tenant."""

    lora_name: str
    lora_path: str | None = None


class _BoundedRequest(Request):
    """A request whose body FastAPI reads with the one bounded JSON reader (issue #31): a body
    nested 100,000 levels deep, not UTF-8 or not JSON is a 400 naming ``body`` and saying why."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = loads(await self.body())
            except JSONRefused as exc:
                raise StarletteHTTPException(400, detail=str(exc)) from None
        return self._json


class BoundedRoute(APIRoute):
    """Every route's request is a ``_BoundedRequest`` (FastAPI's documented way to change how a body is read)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            return await handler(_BoundedRequest(request.scope, request.receive))

        return bounded
