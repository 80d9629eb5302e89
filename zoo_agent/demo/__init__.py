"""Tiny models built locally, for ``zoo-agent demo``, tests and benchmarks (issue #32):
not part of the production resident.
"""
