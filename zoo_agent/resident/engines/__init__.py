"""Engines' own servers as the supervisor's ``WorkerProcess``es (issue #33): llama.cpp's ``llama-server``."""
