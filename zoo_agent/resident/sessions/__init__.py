"""Sessions (issue #32): the transcript format, the store, the prompt built from it,
summaries, and the turns the worker serves; used by the router, the worker and the CLI.
"""
