"""Compiled kernels: fused dequantize-and-multiply, int4 in vector IR, a decode token's routed experts."""

from engine import numba_config  # noqa: F401  (first: how numba compiles this package's code)
