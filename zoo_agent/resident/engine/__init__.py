"""How a worker runs generations (issue #32): one at a time (``serial``) or continuously
batched (``batcher``), both behind the ``Scheduler`` protocol of ``base``.
"""
