"""The zoo-agent command line: click commands over typed library calls; the only place that exits."""

from zoo_agent.cli.main import cli, main

__all__ = ["cli", "main"]
