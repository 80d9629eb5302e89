"""A session turn's decisions (sessions/turns.py, issue #32): testable without a model or a
worker, with a fake backend that counts a prompt's tokens as its messages."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from zoo_agent.resident.sessions.store import Sessions
from zoo_agent.resident.sessions.transcript import SessionTurn
from zoo_agent.resident.sessions.turns import Refusal, session_document, session_turn

MESSAGES = [{"role": "user", "content": "hello"}]


class _Fake:
    """A backend whose prompt is one token per message: nothing is dropped while it fits."""

    def session_prompt(self, history: list[SessionTurn], new_messages: list[dict[str, str]], budget: int | None, *,
                       native: Callable[[SessionTurn], bool] | None = None,
                       preface: list[dict[str, str]] | None = None) -> tuple[int, list[int]]:  # fmt: skip
        return 0, list(range(len(history) * 2 + len(new_messages)))

    def truncate(self, text: str, tokens: int) -> str:
        return text[:tokens]


def _sessions(tmp_path: Path) -> Sessions:
    return Sessions(tmp_path, model_key="tiny@1", dtype="float32", template="", vocab_size=512)


def test_no_sessions_here_is_a_400_naming_the_field() -> None:
    assert session_turn(_Fake(), None, "s1", MESSAGES, lambda: 100) == Refusal(400, "session: sessions are not available here", param="session")
    refused = session_turn(_Fake(), None, "s1", MESSAGES, lambda: 100, route="r")
    assert refused == Refusal(400, "session: route 'r' has no sessions here", param="session")


def test_a_new_session_starts_with_no_cache_and_asks_the_budget_once(tmp_path: Path) -> None:
    asked: list[int] = []

    def budget() -> int:
        asked.append(1)
        return 100

    made = session_turn(_Fake(), _sessions(tmp_path), "s1", MESSAGES, budget)
    assert isinstance(made, tuple)
    turn, messages = made
    assert (turn.id, turn.cache, turn.dropped_turns, messages, asked) == ("s1", "none", 0, MESSAGES, [1])


def test_a_bad_id_and_a_damaged_file_are_refused_without_reading_the_budget(tmp_path: Path) -> None:
    sessions = _sessions(tmp_path)
    never: Callable[[], int] = lambda: 1 // 0  # noqa: E731 - the budget is asked only once the session is read
    bad = session_turn(_Fake(), sessions, "../x", MESSAGES, never)
    assert isinstance(bad, Refusal) and (bad.status, bad.param) == (400, "session")
    sessions.dir.mkdir(parents=True, exist_ok=True)
    (sessions.dir / "s2.json").write_text("{not json")
    damaged = session_turn(_Fake(), sessions, "s2", MESSAGES, never)
    assert isinstance(damaged, Refusal) and (damaged.status, damaged.code) == (422, "session_damaged")
    assert session_document(sessions, "s2") == damaged
    assert session_document(sessions, "s3") == Refusal(404, "session 's3' does not exist", param="session", code="session_not_found")
