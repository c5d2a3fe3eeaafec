"""Layers shared by every architecture, in numpy float32.

Shapes: T = new tokens, S = cached + new tokens, H = hidden size, D = head dim,
nH = query heads, nKV = key/value heads, g = nH // nKV (queries per KV head).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from engine.compute import kernels
from engine.formats.quant import PackedMatrix


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm (Zhang & Sennrich 2019) over the last axis, compiled: at decode numpy's calls cost more than the
    arithmetic (four per layer, 2 ms of a 45 ms token)."""
    rows = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])
    return _rms_norm(rows, np.asarray(weight, np.float32), np.float32(eps)).reshape(x.shape)


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: np.float32) -> np.ndarray:
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        square_sum = np.float32(0)
        for k in range(x.shape[1]):
            square_sum += x[r, k] * x[r, k]
        scale = np.float32(1) / np.sqrt(square_sum / np.float32(x.shape[1]) + eps)
        for k in range(x.shape[1]):
            out[r, k] = x[r, k] * scale * weight[k]
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    # The tanh form never overflows, unlike 1 / (1 + exp(-x)).
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def silu(x: np.ndarray) -> np.ndarray:
    return x * sigmoid(x)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_start: int, window: int | None) -> np.ndarray:
    """Causal grouped-query attention.

    q [nH, T, D] at positions q_start..q_start+T-1; k, v [nKV, S, D] at positions 0..S-1.
    ``window``: a query at position p sees keys at positions > p - window (Mistral's sliding window).
    Returns [T, nH * D].
    """
    n_heads, t, d = q.shape
    n_kv, s, _ = k.shape
    qg = q.reshape(n_kv, n_heads // n_kv, t, d)  # [nKV, g, T, D]
    scores = np.matmul(qg, k.transpose(0, 2, 1)[:, None]) * (1.0 / math.sqrt(d))  # [nKV, g, T, S]
    q_pos = np.arange(q_start, q_start + t)[:, None]
    k_pos = np.arange(s)[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    scores = np.where(visible, scores, -np.inf)
    out = np.matmul(softmax(scores), v[:, None])  # [nKV, g, T, D]
    return out.reshape(n_heads, t, d).transpose(1, 0, 2).reshape(t, n_heads * d)


def attend_latent(
    q_latent: np.ndarray, q_rope: np.ndarray, latent: np.ndarray, k_rope: np.ndarray, q_start: int, scale: float
) -> np.ndarray:
    """Causal multi-head latent attention with the key up-projection absorbed into the queries.

    q_latent [nH, T, R] (each head's query in the latent space), q_rope [nH, T, P] at positions
    q_start..q_start+T-1; latent [S, R] and k_rope [S, P] at positions 0..S-1, shared by the heads.
    Returns [nH, T, R]: each head's attention-weighted latent, for the value up-projection.
    """
    t, s = q_latent.shape[1], latent.shape[0]
    scores = (q_latent @ latent.T + q_rope @ k_rope.T) * scale  # [nH, T, S]
    visible = np.arange(s)[None, :] <= np.arange(q_start, q_start + t)[:, None]
    return softmax(np.where(visible, scores, -np.inf)) @ latent


def l2_normalize(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """x over the root of its squared sum plus eps, along the last axis (as the FLA kernels do)."""
    return x / np.sqrt(np.sum(np.square(x), axis=-1, keepdims=True) + eps)


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def gated_delta_rule(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, decay: np.ndarray, beta: np.ndarray, state: np.ndarray
) -> np.ndarray:
    """The gated delta rule, token by token: per head, S <- exp(g) S, then S <- S + k (beta (v - S^T k))^T, and the
    output is S^T q. q, k [T, nV, dk] (normalised, q scaled), v [T, nV, dv], decay g and beta [T, nV];
    ``state`` [nV, dk, dv] is updated in place. Returns [T, nV, dv]."""
    out = np.empty_like(v)
    for t in range(q.shape[0]):
        state *= np.exp(decay[t])[:, None, None]
        remembered = np.einsum("hkv,hk->hv", state, k[t])
        delta = (v[t] - remembered) * beta[t][:, None]
        state += k[t][:, :, None] * delta[:, None, :]
        out[t] = np.einsum("hkv,hk->hv", state, q[t])
    return out


def linear(
    x: np.ndarray, weight: np.ndarray | PackedMatrix, bias: np.ndarray | None = None, int8_activations: bool = False
) -> np.ndarray:
    """x [T, in] @ weight.T (+ bias): a packed weight through ``kernels.matmul`` (an int4 one with x rounded to int8
    under ``int8_activations``), a float32 one through BLAS."""
    if isinstance(weight, PackedMatrix):
        y = kernels.matmul(x, weight, int8_activations=int8_activations)
    else:
        y = x @ weight.T
    return y if bias is None else y + bias


def swiglu(
    x: np.ndarray, gate_up: np.ndarray | PackedMatrix, down: np.ndarray | PackedMatrix, int8_activations: bool = False
) -> np.ndarray:
    """SwiGLU MLP (Shazeer 2020): x [T, H], gate_up [2I, H] (gate rows then up rows), down [H, I]; see ``linear``
    for ``int8_activations``."""
    gu = linear(x, gate_up, int8_activations=int8_activations)  # [T, 2I]
    i = gu.shape[-1] // 2
    return linear(silu(gu[:, :i]) * gu[:, i:], down, int8_activations=int8_activations)
