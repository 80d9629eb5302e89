"""One tenant's worker process (issue #32): ``main`` (process entry: load, warm up, serve,
drain), ``app`` (the HTTP app), the backends (transformers, Ollama), adapters and their selection.
"""
