"""Grouped-query attention for one decode token, compiled.

At decode the arithmetic of attention is small and numpy's calls dominate it: the split of the projection, the
query and key norms, rotary embedding and the causal softmax cost about 230 µs of a layer's 370 on the 8 GiB
synthetic checkpoint, against 15 compiled. ``project_one`` and ``attend_one`` do what ``Decoder._attention``
does for many tokens (``layers.attend`` and friends) for one, ``project_latent_one`` and ``attend_latent_one``
what ``Decoder._latent_attention`` does (multi-head latent attention, DeepSeek-V3 and Kimi K2.5), in the same
order: the norms are the same compiled ``_rms_norm``, the rotary embeddings the same float32 products and sums;
only the attention's and the up-projections' sums are reordered.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from engine.compute.kernels import FASTMATH
from engine.model.layers import _rms_norm

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


@njit(cache=True)
def project_latent_one(q, compressed, nope, rank, kv_norm, eps, cos, sin, interleaved, k_up):
    """Multi-head latent attention's (query in the latent space [nH, R], rotary query [nH, P], latent [R],
    rotary key [P]) for one token from its query ``q`` [nH, N+P] (``nope`` = N) and its compressed key-value
    projection [R+P] (``rank`` = R), the key up-projection ``k_up`` [nH, N, R] absorbed into the query."""
    latent = _rms_norm(compressed[:rank].copy().reshape(1, rank), kv_norm, eps)[0]
    q_rope, k_rope = q[:, nope:].copy(), compressed[rank:].copy().reshape(1, -1)
    if interleaved:
        q_rope, k_rope = _interleaved(q_rope, cos, sin), _interleaved(k_rope, cos, sin)
    else:
        q_rope, k_rope = _rotated(q_rope, cos, sin), _rotated(k_rope, cos, sin)
    return _absorbed(q, nope, k_up), q_rope, latent, k_rope[0]


@njit(fastmath=FASTMATH, cache=True)
def _absorbed(q, nope, k_up):
    """Each head's non-rotary query [N] times its key up-projection [N, R]: the query in the latent space."""
    n_heads, _, rank = k_up.shape
    q_latent = np.zeros((n_heads, rank), np.float32)
    for h in range(n_heads):
        for n in range(nope):
            for j in range(rank):
                q_latent[h, j] += q[h, n] * k_up[h, n, j]
    return q_latent


@njit(cache=True)
def _interleaved(x, cos, sin):
    """``Rope.apply_interleaved`` for one token: x [heads, P] with its rotary pairs adjacent."""
    half = x.shape[1] // 2
    out = np.empty_like(x)
    for h in range(x.shape[0]):
        for j in range(half):
            even, odd = x[h, 2 * j], x[h, 2 * j + 1]
            out[h, j] = even * cos[j] - odd * sin[j]
            out[h, j + half] = odd * cos[j] + even * sin[j]
    return out


@njit(fastmath=FASTMATH, cache=True)
def attend_latent_one(q_latent, q_rope, latents, k_ropes, length, scale, v_up):
    """The newest token's latent attention over the first ``length`` of the cached ``latents`` [capacity, R] and
    ``k_ropes`` [capacity, P] (its own last), each head's weighted latent taken up by ``v_up`` [nH, V, R]:
    [nH * V]."""
    n_heads, rank = q_latent.shape
    values = v_up.shape[1]
    scale = np.float32(scale)
    scores = np.empty(length, np.float32)
    mixed = np.empty(rank, np.float32)
    out = np.empty(n_heads * values, np.float32)
    for h in range(n_heads):
        for s in range(length):
            acc = np.float32(0)
            for j in range(rank):
                acc += q_latent[h, j] * latents[s, j]
            rope = np.float32(0)
            for j in range(q_rope.shape[1]):
                rope += q_rope[h, j] * k_ropes[s, j]
            scores[s] = (acc + rope) * scale
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        mixed[:] = 0
        for s in range(length):
            for j in range(rank):
                mixed[j] += weights[s] * latents[s, j]
        for v in range(values):
            acc = np.float32(0)
            for j in range(rank):
                acc += mixed[j] * v_up[h, v, j]
            out[h * values + v] = acc
    return out
