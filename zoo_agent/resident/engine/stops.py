"""OpenAI's ``stop``: the answer ends before the first stop sequence generated (issue #17).

Three parts: ``cut`` on the finished text (the truth, whatever generation did), a stopping
criterion that ends generation soon after a stop sequence appears (decoding only a window
of the newest tokens, so each step stays cheap), and ``StopFilter`` for streams, which
holds back text that could still become a stop sequence so that nothing past it is sent.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["StopFilter", "criteria", "cut", "hit", "window"]


def cut(text: str, stops: tuple[str, ...]) -> str | None:
    """The text before the earliest stop sequence in it, or None when there is none."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(found)] if found else None


class StopFilter:
    """Streamed pieces in, the text that may be sent out; ``stopped`` once a sequence appeared."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.held, self.stopped = stops, "", False

    def feed(self, piece: str) -> str:
        if self.stopped or not self.stops:
            return "" if self.stopped else piece
        text = self.held + piece
        before = cut(text, self.stops)
        if before is not None:
            self.stopped, self.held = True, ""
            return before
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """At the end of generation: what was held back was no stop sequence after all."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out


def window(stops: tuple[str, ...]) -> int:
    """How many of the newest tokens can hold a stop sequence: a byte-level token holds at least one byte of a character."""
    return 4 * max((len(s) for s in stops), default=0) + 4


def hit(tokenizer: Any, newest: Any, stops: tuple[str, ...]) -> bool:
    """Whether the newest generated ids (a short window: each step stays cheap) hold a stop sequence."""
    text = tokenizer.decode(newest, skip_special_tokens=True)
    return any(s in text for s in stops)


def criteria(cancel: threading.Event | None, tokenizer: Any, stops: tuple[str, ...], prompt_len: int) -> Any:
    """Stop at the next token once ``cancel`` is set (a client went away) or a stop sequence was generated."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    newest = window(stops)

    class Stop(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
            if cancel is not None and cancel.is_set():
                return True
            if not stops:
                return False
            return hit(tokenizer, input_ids[0, prompt_len:][-newest:], stops)

    return StoppingCriteriaList([Stop()])
