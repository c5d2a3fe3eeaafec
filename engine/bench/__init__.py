"""Benchmark protocol: measure the disk and the engine so the search can compare against rooflines."""

from engine import numba_config  # noqa: F401  (first: how numba compiles this package's code)
