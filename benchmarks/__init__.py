"""Benchmarks a user runs, from the repository root: `python -m benchmarks.NAME`."""
