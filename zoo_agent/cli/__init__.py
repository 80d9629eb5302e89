"""The zoo-agent command line: the only place that exits."""
