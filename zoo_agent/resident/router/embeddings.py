"""``POST /v1/embeddings`` through the router (issue #36): as a chat completion goes, less what only
generation has. The request was read and checked once (``inbound.parse_request``: its tenant is a
served embedding tenant, its body a valid request); here it gets its priority (the header or the
body's field, granted by the same rule), waits in its tenant's queue while the tenant pages in, and
is forwarded to the tenant's worker, which answers with one JSON document. No route names an
embedding tenant and no peer is asked for one (``index/checks.py`` refuses both), so neither is tried.
"""

from __future__ import annotations

from typing import Protocol

from zoo_agent.resident.inbound import Parsed
from zoo_agent.resident.wire.http import Receive, Scope, Send, error, respond
from zoo_agent.resident.wire.priority import BadPriority, PriorityNotAllowed

__all__ = ["Forwarding", "forward_embeddings"]


class Forwarding(Protocol):
    """The router's part an embedding request uses: its priority rules and its forwarding to a tenant's worker."""

    def _default_priority(self, tenant: str) -> int: ...

    def _grant(self, scope: Scope, parsed: Parsed, default: int, routed: None) -> int: ...

    async def _forward(self, scope: Scope, receive: Receive, send: Send, body: bytes, tenant: str, priority: int, stream: bool,
                       session: bool = False) -> None: ...  # fmt: skip


async def forward_embeddings(router: Forwarding, scope: Scope, receive: Receive, send: Send, body: bytes, parsed: Parsed) -> None:
    """Grant the request its priority, then wait for a place in its tenant's worker and relay the answer."""
    try:
        priority = router._grant(scope, parsed, router._default_priority(parsed.tenant), None)
    except BadPriority as exc:
        allowed = not isinstance(exc, PriorityNotAllowed)
        await respond(send, *error(400 if allowed else 403, str(exc), param=exc.param, code=None if allowed else "priority_not_allowed"))
        return
    await router._forward(scope, receive, send, body, parsed.tenant, priority, False)
