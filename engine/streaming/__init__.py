"""Experts from disk to the compute: aligned reads, the store, its cache policies and predictors."""

from engine import numba_config  # noqa: F401  (first: how numba compiles this package's code)
