"""The resident inference service: one supervised worker per host (issue #5).

Split like uvicorn: ``config`` (data only), ``worker`` (load, a real warm-up generation,
serve, drain), ``supervisor`` (owns the socket, restarts workers, talks to systemd).
torch and transformers are imported inside the worker only.
"""
