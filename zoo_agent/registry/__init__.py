"""The index as a model registry, seen from CI (issue #35).

``pins.py`` (pure): what changed between two index documents, file by file.
``hubcheck.py``: a changed pin against the hub's LFS metadata, without downloading.
``pull.py`` (pure): the branch, title and body of a model-update pull request.
``github.py``: the few GitHub REST calls that commit the index and open that pull request.
``zoo-agent registry update-pr`` and ``check-pins`` (``cli/registry.py``) put them together.
"""
