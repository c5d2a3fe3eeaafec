"""Routing traces, the simulator that replays them, the optimal cache bound, routing statistics."""

from engine import numba_config  # noqa: F401  (first: how numba compiles this package's code)
