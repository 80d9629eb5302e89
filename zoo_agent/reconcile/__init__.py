"""Observe the zoo, apply a plan, verify, report status and progress."""
