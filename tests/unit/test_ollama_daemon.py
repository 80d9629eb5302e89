"""The Ollama daemon away is the tenant's trouble, never the worker's end (issue #35): the backoff
rule, what a request is told, and which failures of the real `ollama` client mean "away" (a
stand-in client raising what the real one raises; the daemon itself is tests/support/ollamaserver.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import ollama
import pytest

from zoo_agent.errors import BackendError
from zoo_agent.resident.engine.base import Generated, Request
from zoo_agent.resident.worker.daemon import Availability, Away, backoff, unavailable, watch
from zoo_agent.resident.worker.ollama_backend import OllamaBackend
from zoo_agent.resident.worker.responses import failure


def test_the_backoff_doubles_from_half_a_second_and_is_capped() -> None:
    assert [backoff(n, 5.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff(10**6, 5.0) == 5.0 and backoff(0, 5.0) == 0.5  # no overflow, no negative exponent


def test_a_request_is_told_the_tenant_the_daemon_and_when_to_ask_again() -> None:
    a = Availability("chat", "http://127.0.0.1:11434", cap=5.0)
    assert a.refusal() is None and unavailable(object()) is None
    assert a.down("the Ollama daemon at http://127.0.0.1:11434 does not answer (ConnectError)", now=100.0) is True
    assert a.down("the Ollama daemon at http://127.0.0.1:11434 does not answer (ConnectError)", now=100.5) is False  # once: logged once
    refusal = a.refusal(now=100.5)
    assert isinstance(refusal, Away) and refusal.retry_after == 1  # two failures: 1 s
    assert str(refusal) == "tenant 'chat' is unavailable: the Ollama daemon at http://127.0.0.1:11434 does not answer (ConnectError); trying it again in 1s"
    assert failure(refusal) == (503, {"message": str(refusal), "type": "server_error", "param": None, "code": "model_unavailable"})
    a.down("x\nInjected: header \x1b[31mred\x00" + "long " * 100, now=101.5)  # a daemon's 5xx body: another process's words
    assert a.why.startswith("x Injected: header [31mred long") and len(a.why) <= 300 and a.why.isprintable()
    assert a.failures == 3 and a.retry_at == 103.5
    assert a.up() is True and a.refusal() is None and a.failures == 0


class _Client:
    """Stands in for ollama.Client: raises what the real one raises for each way the daemon fails."""

    def __init__(self, raising: BaseException | None) -> None:
        self.raising, self.calls = raising, list[str]()

    def _maybe(self, name: str) -> Any:
        self.calls.append(name)
        if self.raising is not None:
            raise self.raising
        return type("Answer", (), {"models": [], "message": None, "response": "ok", "prompt_eval_count": 1, "eval_count": 1,
                                   "done_reason": "stop", "done": True})()  # fmt: skip

    def show(self, *a: Any, **k: Any) -> Any:
        return self._maybe("show")

    def generate(self, *a: Any, **k: Any) -> Any:
        return self._maybe("generate")

    def chat(self, *a: Any, **k: Any) -> Any:
        return self._maybe("chat")

    def ps(self, *a: Any, **k: Any) -> Any:
        return self._maybe("ps")


def _backend(raising: BaseException | None) -> OllamaBackend:
    backend = OllamaBackend("llama3.2:1b", "http://127.0.0.1:9", tenant="chat")
    backend.client = backend.probe = _Client(raising)  # type: ignore[assignment]
    return backend


@pytest.mark.parametrize(("raising", "says"), [
    (ConnectionError("Failed to connect to Ollama."), "does not answer (ConnectionError)"),
    (httpx.ConnectError("refused"), "does not answer (ConnectError)"),
    (httpx.ReadTimeout("slow"), "does not answer (ReadTimeout)"),
    (httpx.RemoteProtocolError("closed"), "does not answer (RemoteProtocolError)"),
    (ollama.ResponseError("model 'llama3.2:1b' not found", 404), "does not have llama3.2:1b (HTTP 404; zoo-agent apply pulls it again)"),
    (ollama.ResponseError("out of memory\nloading model", 500), "answered HTTP 500: out of memory loading model"),
    (ollama.ResponseError("busy", 503), "answered HTTP 503: busy"),
])  # fmt: skip
def test_the_daemon_away_is_the_tenants_503_and_a_start_without_it_is_no_failure(raising: BaseException, says: str) -> None:
    backend = _backend(raising)
    assert backend.load() >= 0  # at start: unavailable, not failed (no exception reaches the worker's load)
    assert backend.daemon.why == f"the Ollama daemon at http://127.0.0.1:9 {says}"
    calls = len(backend.client.calls)  # type: ignore[attr-defined]
    with pytest.raises(Away) as refused:
        backend.complete(Request(None, "hi", 4, 0.0, 1.0), Generated())
    assert str(refused.value).startswith(f"tenant 'chat' is unavailable: the Ollama daemon at http://127.0.0.1:9 {says}; trying it again in ")
    assert len(backend.client.calls) == calls  # type: ignore[attr-defined]  # refused before the daemon is asked again
    assert failure(refused.value)[0] == 503


def test_a_request_the_daemon_refuses_is_that_requests_failure_not_the_tenants() -> None:
    backend = _backend(ollama.ResponseError("invalid option", 400))
    with pytest.raises(BackendError, match="HTTP 400: invalid option") as failed:
        backend.complete(Request(None, "hi", 4, 0.0, 1.0), Generated())
    assert not isinstance(failed.value, Away) and backend.daemon.why == ""


@pytest.mark.parametrize("raising", [ollama.ResponseError("the model runner crashed", 500), httpx.ReadTimeout("slow"),
                                     ollama.ResponseError("not found", 404)])
def test_a_request_only_it_fails_never_takes_the_tenant_away_from_the_others(raising: BaseException) -> None:
    """A generation the daemon fails (or outlasts the timeout) while the daemon answers otherwise is
    that request's failure: the daemon is asked once, and the tenant stays available."""
    backend = _backend(None)
    client: Any = backend.client

    def failing(*a: Any, **k: Any) -> Any:
        client.calls.append("chat")
        raise raising

    client.chat = client.generate = failing
    with pytest.raises(BackendError, match="and it answers otherwise: this request failed") as failed:
        backend.complete(Request([{"role": "user", "content": "hi"}], None, 4, 0.0, 1.0), Generated())
    assert not isinstance(failed.value, Away) and backend.daemon.why == "" and client.calls == ["chat", "show"]
    client.raising = ollama.ResponseError("model 'llama3.2:1b' not found", 404)  # and now the daemon lost the model
    with pytest.raises(Away, match="does not have llama3.2:1b"):
        backend.complete(Request([{"role": "user", "content": "hi"}], None, 4, 0.0, 1.0), Generated())
    assert backend.daemon.failures == 1  # marked once, by the check


def test_a_stream_broken_off_by_the_daemon_marks_it_away() -> None:
    backend = _backend(None)

    def parts(*a: Any, **k: Any) -> Any:
        yield type("Part", (), {"message": None, "response": "one ", "done": False})()
        raise httpx.ReadError("connection reset")

    backend.client.chat = backend.client.generate = parts  # type: ignore[method-assign]
    backend.probe = _Client(httpx.ConnectError("refused"))  # type: ignore[assignment]  # the daemon is gone, not only this answer
    got = []
    with pytest.raises(Away, match="does not answer \\(ConnectError\\)"):
        for piece in backend.stream(Request(None, "hi", 4, 0.0, 1.0), Generated()):
            got.append(piece)
    assert got == ["one "] and backend.daemon.why


def test_the_watcher_retries_until_the_daemon_answers_then_warms_up_and_never_raises() -> None:
    backend = _backend(ConnectionError("refused"))
    backend.daemon.cap = 0.5
    assert backend.load() >= 0 and backend.daemon.why
    warmed, stopping = list[int](), [False]

    def warm_up() -> None:
        warmed.append(1)
        stopping[0] = True

    async def run() -> None:
        watcher = asyncio.create_task(watch(backend, warm_up, 60.0, lambda: stopping[0]))
        while len(backend.client.calls) < 3:  # type: ignore[attr-defined]  # tried again, with backoff
            await asyncio.sleep(0.05)
        assert not warmed and backend.daemon.why
        backend.client.raising = None  # type: ignore[attr-defined]  # the daemon is back
        await asyncio.wait_for(watcher, timeout=30)

    asyncio.run(run())
    assert warmed == [1] and backend.daemon.why == "" and backend.daemon.failures == 0
