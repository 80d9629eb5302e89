"""The resident inference service: one router and one supervised worker process per loaded tenant.

Split like uvicorn: ``config`` (data only), ``worker`` (load, a real warm-up generation,
serve, drain), ``supervisor`` (pages workers in and out of the memory budget, restarts
them, the only voice to systemd), ``router`` (owns the public socket, queues and forwards
each request to its tenant's worker or to a peer). torch and transformers are imported
inside the worker only; docs/architecture.md draws the whole.
"""
