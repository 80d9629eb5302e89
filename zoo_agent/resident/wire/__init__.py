"""What crosses the resident's process boundaries, defined once (issue #32).

``http``: the ASGI aliases and primitives, the body limit and the one map from our errors to
OpenAI error bodies (JSON and SSE), for the router, the gate and the workers alike;
``headers``: the private headers; ``gate``: the outermost middleware; ``priority``: the
classes and the queue; ``control``: the supervisor's messages to and from its workers;
``documents``: ``/health``, the ``/v1/models`` cards, ``state.json`` and ``x_zoo``, typed.
"""
