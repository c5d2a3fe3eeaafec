"""The forward pass: layers, attention, the decoder, loading a model, generating."""

from engine import numba_config  # noqa: F401  (first: how numba compiles this package's code)
