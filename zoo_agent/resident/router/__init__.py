"""The router, in the supervisor's process: one request from the public socket to a worker or a peer (issues #20, #32).

``app``: the ASGI entry (``Router``), which dispatches; ``admission``: queues and places in a
tenant's worker; ``federation``, ``peers`` and ``peer_answer``: the peers and what their answers
may carry. It shares one object with the supervisor, the ``SlotTable`` (``resident/slots.py``).
"""
