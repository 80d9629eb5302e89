"""The private headers, named once (issue #32): who may send each is the gate's and the router's rule."""

from __future__ import annotations

__all__ = ["PEER", "PRIORITY", "SESSION_ROUTE"]

#: A request's priority class (``wire/priority.py``); above ``default`` only with the priority key.
PRIORITY = "X-Zoo-Priority"
#: The route a session belongs to, set by the router only: a worker keeps the route's transcript.
SESSION_ROUTE = "X-Zoo-Session-Route"
#: On a request one host delegates to another (issue #22): the origin's host id. Such a request needs the
#: fleet key, is answered only for tenants the host accepts from peers, and is never delegated again.
PEER = "X-Zoo-Peer"
