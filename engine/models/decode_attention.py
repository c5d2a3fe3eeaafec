"""Grouped-query attention for one decode token, compiled.

At decode the arithmetic of attention is small and numpy's calls dominate it: the split of the projection, the
query and key norms, rotary embedding and the causal softmax cost about 230 µs of a layer's 370 on the 8 GiB
synthetic checkpoint, against 15 compiled. ``project_one`` and ``attend_one`` do what ``Decoder._attention``
does for many tokens (``layers.attend`` and friends) for one, in the same order: the norms are the same compiled
``_rms_norm``, the rotary embedding the same float32 products and sum; only the attention's sums are reordered.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from engine.kernels import FASTMATH
from engine.models.layers import _rms_norm

NORMS = {"none": 0, "per_head": 1, "full": 2}  # DecoderSpec.qk_norm


@njit(cache=True)
def project_one(qkv, n_heads, n_kv, d, gated, norm, q_norm, k_norm, eps, clip, cos, sin):
    """(query [nH, D], output gate [nH, D] or empty, key [nKV, D], value [nKV, D]) of one token from its stacked
    projection ``qkv``: split (with Qwen3.5's gate after each head's query), normed (``norm``: see ``NORMS``),
    clipped to ±``clip`` when positive, the query and key rotated by ``cos`` and ``sin`` [r], r <= D."""
    q_width = n_heads * d * (2 if gated else 1)
    if gated:
        both = qkv[:q_width].reshape(n_heads, 2 * d)
        q, gate = both[:, :d].copy(), both[:, d:].copy()
    else:
        q, gate = qkv[:q_width].reshape(n_heads, d).copy(), np.empty((0, d), np.float32)
    k = qkv[q_width : q_width + n_kv * d].reshape(n_kv, d).copy()
    v = qkv[q_width + n_kv * d :].reshape(n_kv, d).copy()
    if norm == 2:
        q = _rms_norm(q.reshape(1, -1), q_norm, eps).reshape(n_heads, d)
        k = _rms_norm(k.reshape(1, -1), k_norm, eps).reshape(n_kv, d)
    if clip > 0:
        q, k, v = np.clip(q, -clip, clip), np.clip(k, -clip, clip), np.clip(v, -clip, clip)
    if norm == 1:
        q, k = _rms_norm(q, q_norm, eps), _rms_norm(k, k_norm, eps)
    return _rotated(q, cos, sin), gate, _rotated(k, cos, sin), v


@njit(cache=True)
def _rotated(x, cos, sin):
    """``Rope.apply`` for one token: x [heads, D] rotated in its first r dims ("rotate half")."""
    half = len(cos) // 2
    out = x.copy()
    for h in range(x.shape[0]):
        for j in range(half):
            out[h, j] = x[h, j] * cos[j] + -x[h, j + half] * sin[j]
            out[h, j + half] = x[h, j + half] * cos[j + half] + x[h, j] * sin[j + half]
    return out


@njit(fastmath=FASTMATH, cache=True)
def attend_one(q, gate, keys, values, length, window):
    """Causal attention of the newest token (query ``q`` [nH, D]) over the first ``length`` of ``keys``
    [nKV, capacity, D] and ``values`` [nKV, capacity, Dv] (whole, contiguous: the loops vectorise), the last of
    which are its own; ``window`` > 0 limits it to the last ``window`` keys. With a ``gate`` [nH, Dv], each head's
    output is scaled by its sigmoid. Returns [nH * Dv]."""
    n_heads, d = q.shape
    n_kv, _, dv = values.shape
    group = n_heads // n_kv
    first = 0 if window <= 0 else max(0, length - window)
    scale = np.float32(1.0 / math.sqrt(d))
    scores = np.empty(length - first, np.float32)
    out = np.zeros(n_heads * dv, np.float32)
    for h in range(n_heads):
        kv = h // group
        for s in range(first, length):
            acc = np.float32(0)
            for j in range(d):
                acc += q[h, j] * keys[kv, s, j]
            scores[s - first] = acc * scale
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        head = out[h * dv : (h + 1) * dv]
        for s in range(first, length):
            for j in range(dv):
                head[j] += weights[s - first] * values[kv, s, j]
        if gate.size:
            for j in range(dv):
                head[j] *= np.float32(0.5) * (np.float32(1) + np.tanh(np.float32(0.5) * gate[h, j]))
    return out
