"""The MoE decoder shared by every architecture: resident dense weights, experts through an ExpertStore.

Shapes: T = tokens in this call, H = hidden, D = head dim, E = experts, k = active experts, V = vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit
from threadpoolctl import ThreadpoolController

from engine.architectures.rope import Rope
from engine.architectures.spec import DecoderSpec, GroupedSigmoidRouter
from engine.compute.int8_activations import BLOCK as INT8_BLOCK
from engine.compute.int8_activations import supported as int8_supported
from engine.compute.moe_kernel import routed_experts
from engine.compute.moe_kernel import supported as routed_experts_supported
from engine.config import RESIDENT_GROUP_SIZE, EngineConfig
from engine.errors import ConfigError
from engine.formats.checkpoint import Checkpoint
from engine.formats.expert_layout import INT4_FORMATS, ExpertLayout, PackedExpert, locate_experts, repacked_layouts
from engine.formats.quant import PackedMatrix, dequantize, quantize
from engine.formats.repack_manifest import is_repacked, load_manifest
from engine.formats.tensor_names import MODEL_PREFIXES, model_prefix, moe_prefix
from engine.model.decode_attention import (
    NORMS,
    attend_latent_one,
    attend_one,
    project_latent_one,
    project_one,
)
from engine.model.experts import expert_mlp
from engine.model.layers import (
    attend,
    attend_latent,
    gated_delta_rule,
    l2_normalize,
    linear,
    rms_norm,
    sigmoid,
    silu,
    softmax,
    softplus,
    swiglu,
)
from engine.streaming.expert_store import ExpertStore

# The forward pass's threads are the kernels' (numba's, which spin briefly between calls: ``kernels``); BLAS
# threads started between them would contend for the same cores (measured on 2 cores: a decode token 6x slower),
# so BLAS runs on the calling thread. Prefill gained too: 128 tokens at 58 tok/s instead of 46.
_BLAS = ThreadpoolController()


class KVCache:
    """Keys and values of every layer, [nKV, capacity, D] and [nKV, capacity, Dv], grown by doubling. Under
    latent attention the "keys" are the shared latent [1, capacity, R] and the "values" its rotary keys
    [1, capacity, P]."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, value_dim: int, capacity: int = 256):
        self.keys = [np.empty((num_kv_heads, capacity, head_dim), np.float32) for _ in range(num_layers)]
        self.values = [np.empty((num_kv_heads, capacity, value_dim), np.float32) for _ in range(num_layers)]
        self.length = 0  # tokens stored (all layers advance together)
        # Gated DeltaNet layers keep, instead of keys and values, their convolution's last inputs and their state.
        self.recurrent: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store k, v [nKV, T, D] after the cached tokens; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[1]
        if end > self.keys[layer].shape[1]:
            grown = max(end, 2 * self.keys[layer].shape[1])
            for cached in (self.keys, self.values):
                old = cached[layer]
                cached[layer] = np.empty((old.shape[0], grown, old.shape[2]), np.float32)
                cached[layer][:, :start] = old[:, :start]
        self.keys[layer][:, start:end] = k
        self.values[layer][:, start:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]


@dataclass
class Attention:
    """The projections as the checkpoint stores them (bfloat16 kept packed, see ``Checkpoint.read_matrix``), or as
    ``resident_weights`` quantized them."""

    qkv: np.ndarray | PackedMatrix  # [nH*D (x2 with an output gate) + 2*nKV*D, H]: q, k and v stacked, one call
    o: np.ndarray | PackedMatrix  # [H, nH*D]
    qkv_bias: np.ndarray | None
    o_bias: np.ndarray | None
    q_norm: np.ndarray | None
    k_norm: np.ndarray | None


@dataclass
class LatentAttentionWeights:
    """Multi-head latent attention; the key and value up-projections are kept per head for absorption."""

    q: np.ndarray | PackedMatrix | None  # [nH*(N+P), H] without a q low-rank projection
    q_a: np.ndarray | PackedMatrix | None  # [Rq, H]
    q_a_bias: np.ndarray | None
    q_a_norm: np.ndarray | None  # [Rq]
    q_b: np.ndarray | PackedMatrix | None  # [nH*(N+P), Rq]
    kv_a: np.ndarray | PackedMatrix  # [R+P, H]
    kv_a_bias: np.ndarray | None
    kv_a_norm: np.ndarray  # [R]
    k_up: np.ndarray  # [nH, N, R]: a head's non-rotary key from the latent
    v_up: np.ndarray  # [nH, V, R]
    o: np.ndarray | PackedMatrix  # [H, nH*V]
    o_bias: np.ndarray | None


@dataclass
class DeltaNetWeights:
    """A Gated DeltaNet layer's weights."""

    qkv: np.ndarray | PackedMatrix  # [2*nK*dk + nV*dv, H]
    z: np.ndarray | PackedMatrix  # [nV*dv, H]: the output gate
    b: np.ndarray  # [nV, H]: beta, the write strength
    a: np.ndarray  # [nV, H]: the decay's input
    conv: np.ndarray  # [2*nK*dk + nV*dv, K]: depthwise causal convolution
    dt_bias: np.ndarray  # [nV]
    decay_rate: np.ndarray  # [nV]: exp(A_log)
    norm: np.ndarray  # [dv]
    out: np.ndarray | PackedMatrix  # [H, nV*dv]


@dataclass
class Layer:
    input_norm: np.ndarray
    post_attention_norm: np.ndarray
    attention: Attention | LatentAttentionWeights | DeltaNetWeights
    router: np.ndarray | PackedMatrix | None  # [E, H] for MoE layers
    dense: tuple[np.ndarray | PackedMatrix, np.ndarray | PackedMatrix] | None  # (gate_up [2I, H], down [H, I])
    shared_expert: tuple[np.ndarray | PackedMatrix, np.ndarray | PackedMatrix] | None
    shared_expert_gate: np.ndarray | None  # [1, H]
    router_bias: np.ndarray | None = None  # [E]: the grouped sigmoid router's choice correction
    # dense and shared_expert as one expert of the decode kernel (``one_expert``), where it can take them
    dense_expert: PackedExpert | None = None
    shared_expert_one: PackedExpert | None = None


@dataclass
class Routing:
    """The experts a MoE layer chose for each token of one call."""

    experts: np.ndarray  # [T, k] expert ids, best first
    weights: np.ndarray  # [T, k]
    probs: np.ndarray  # [T, E] what the choice ranks: softmax probabilities, or the grouped router's scores


RouteObserver = Callable[[int, np.ndarray, "Routing"], None]


class Decoder:
    """A loaded model: call ``forward`` with token ids and a KV cache to get logits.

    ``route_observer``, when set, sees every MoE layer's input [T, H] and routing (for statistics and traces).
    """

    def __init__(
        self,
        spec: DecoderSpec,
        config: EngineConfig,
        checkpoint: Checkpoint,
        store: ExpertStore,
        layers: list[Layer],
        embed: np.ndarray,
        final_norm: np.ndarray,
        lm_head: np.ndarray,
    ):
        self.spec = spec
        self.config = config
        self.checkpoint = checkpoint
        self.store = store
        self.layers = layers
        self.embed = embed  # [V, H]
        self.final_norm = final_norm
        self.lm_head = lm_head  # [V, H]
        self.route_observer: RouteObserver | None = None
        # int4 resident matrices (``resident_weights``) multiply int8 activations when the experts do
        self.resident_int8 = config.activations == "int8" and config.resident_weights == "int4"

    def new_cache(self) -> KVCache:
        s, latent = self.spec, self.spec.latent_attention
        if latent is not None:
            return KVCache(s.num_layers, 1, latent.kv_lora_rank, latent.qk_rope_head_dim)
        return KVCache(s.num_layers, s.num_kv_heads, s.head_dim, s.head_dim)

    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = True) -> np.ndarray:
        """Logits [T, V] for token ``ids`` [T] following the cached ones (only the last row unless all_logits)."""
        with _BLAS.limit(limits=1, user_api="blas"):  # see _BLAS
            return self._forward(ids, cache, all_logits)

    def _forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool) -> np.ndarray:
        s = self.spec
        start = cache.length
        self.store.begin_forward()
        x = self.embed[ids]  # [T, H]
        cos, sin = s.rope.tables(np.arange(start, start + len(ids)))
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_norm, s.rms_norm_eps)
            x = x + self._attention(i, layer.attention, h, cache, start, cos, sin)
            h = rms_norm(x, layer.post_attention_norm, s.rms_norm_eps)
            x = x + self._mlp(i, layer, h)
        cache.length = start + len(ids)
        if not all_logits:
            x = x[-1:]
        return rms_norm(x, self.final_norm, s.rms_norm_eps) @ self.lm_head.T

    def _attention(
        self,
        i: int,
        a: Attention | LatentAttentionWeights | DeltaNetWeights,
        h: np.ndarray,
        cache: KVCache,
        start: int,
        cos: np.ndarray,
        sin: np.ndarray,
    ) -> np.ndarray:
        if isinstance(a, LatentAttentionWeights):
            return self._latent_attention(i, a, h, cache, start, cos, sin)
        if isinstance(a, DeltaNetWeights):
            return self._delta_net(i, a, h, cache)
        s = self.spec
        t = h.shape[0]
        if t == 1:  # decode: compiled, see decode_attention
            q_norm, k_norm = (_NONE if n is None else n for n in (a.q_norm, a.k_norm))
            q, gate, k, v = project_one(
                self._linear(h, a.qkv, a.qkv_bias)[0], s.num_heads, s.num_kv_heads, s.head_dim, s.attention_output_gate,
                NORMS[s.qk_norm], q_norm, k_norm, np.float32(s.rms_norm_eps), np.float32(s.clip_qkv or 0),
                cos[0], sin[0],
            )  # fmt: skip
            cache.append(i, k[:, None], v[:, None])
            out = attend_one(q, gate, cache.keys[i], cache.values[i], start + 1, s.sliding_windows[i] or 0)
            return self._linear(out[None], a.o, a.o_bias)
        q_out = s.num_heads * s.head_dim * (2 if s.attention_output_gate else 1)
        q, k, v = np.split(self._linear(h, a.qkv, a.qkv_bias), [q_out, q_out + s.num_kv_heads * s.head_dim], axis=1)
        gate = None
        if s.attention_output_gate:  # per head: the query, then as many gate values
            q, gate = np.split(q.reshape(t, s.num_heads, 2 * s.head_dim), 2, axis=-1)
            q, gate = q.reshape(t, -1), gate.reshape(t, -1)
        if s.qk_norm == "full":
            q, k = rms_norm(q, a.q_norm, s.rms_norm_eps), rms_norm(k, a.k_norm, s.rms_norm_eps)
        if s.clip_qkv is not None:
            q, k, v = (np.clip(m, -s.clip_qkv, s.clip_qkv) for m in (q, k, v))
        q = q.reshape(t, s.num_heads, s.head_dim).transpose(1, 0, 2)  # [nH, T, D]
        k = k.reshape(t, s.num_kv_heads, s.head_dim).transpose(1, 0, 2)  # [nKV, T, D]
        v = v.reshape(t, s.num_kv_heads, s.head_dim).transpose(1, 0, 2)
        if s.qk_norm == "per_head":
            q, k = rms_norm(q, a.q_norm, s.rms_norm_eps), rms_norm(k, a.k_norm, s.rms_norm_eps)
        q, k = Rope.apply(q, cos, sin), Rope.apply(k, cos, sin)
        keys, values = cache.append(i, k, v)
        out = attend(q, keys, values, start, s.sliding_windows[i])
        return self._linear(out if gate is None else out * sigmoid(gate), a.o, a.o_bias)

    def _delta_net(self, i: int, a: DeltaNetWeights, h: np.ndarray, cache: KVCache) -> np.ndarray:
        s, net = self.spec, self.spec.gated_delta_net
        assert net is not None
        t = h.shape[0]
        key_dim, repeat = net.num_key_heads * net.key_head_dim, net.num_value_heads // net.num_key_heads
        if i not in cache.recurrent:
            cache.recurrent[i] = (
                np.zeros((net.conv_kernel - 1, a.conv.shape[0]), np.float32),
                np.zeros((net.num_value_heads, net.key_head_dim, net.value_head_dim), np.float32),
            )
        history, state = cache.recurrent[i]
        inputs = np.concatenate([history, self._linear(h, a.qkv)])  # [K-1+T, C]: the convolution's window
        mixed = sum(inputs[n : n + t] * a.conv[:, n] for n in range(net.conv_kernel))
        cache.recurrent[i] = (inputs[t:], state)
        mixed = silu(mixed)
        q = mixed[:, :key_dim].reshape(t, net.num_key_heads, net.key_head_dim)
        k = mixed[:, key_dim : 2 * key_dim].reshape(t, net.num_key_heads, net.key_head_dim)
        v = mixed[:, 2 * key_dim :].reshape(t, net.num_value_heads, net.value_head_dim)
        q = np.repeat(l2_normalize(q), repeat, axis=1) / np.sqrt(net.key_head_dim)
        k = np.repeat(l2_normalize(k), repeat, axis=1)
        beta = sigmoid(h @ a.b.T)
        decay = -a.decay_rate * softplus(h @ a.a.T + a.dt_bias)
        out = gated_delta_rule(q, k, v, decay, beta, state)  # [T, nV, dv]
        z = self._linear(h, a.z).reshape(t, net.num_value_heads, net.value_head_dim)
        out = rms_norm(out, a.norm, s.rms_norm_eps) * silu(z)
        return self._linear(out.reshape(t, -1), a.out)

    def _latent_attention(
        self,
        i: int,
        a: LatentAttentionWeights,
        h: np.ndarray,
        cache: KVCache,
        start: int,
        cos: np.ndarray,
        sin: np.ndarray,
    ) -> np.ndarray:
        s, m = self.spec, self.spec.latent_attention
        assert m is not None
        t, eps = h.shape[0], s.rms_norm_eps
        low_rank_q = a.q_a is not None
        if low_rank_q:
            q = self._linear(rms_norm(self._linear(h, a.q_a, a.q_a_bias), a.q_a_norm, eps), a.q_b)
        else:
            q = self._linear(h, a.q)
        if t == 1:  # decode: compiled, see decode_attention
            q_latent, q_rope, latent, k_rope = project_latent_one(
                q.reshape(s.num_heads, -1), self._linear(h, a.kv_a, a.kv_a_bias)[0], m.qk_nope_head_dim, m.kv_lora_rank,
                a.kv_a_norm, np.float32(eps), cos[0], sin[0], m.interleaved_rope, a.k_up,
            )  # fmt: skip
            cache.append(i, latent[None, None], k_rope[None, None])
            out = attend_latent_one(
                q_latent, q_rope, cache.keys[i][0], cache.values[i][0], start + 1, m.softmax_scale, a.v_up
            )
            return self._linear(out[None], a.o, a.o_bias)
        q = q.reshape(t, s.num_heads, m.qk_nope_head_dim + m.qk_rope_head_dim).transpose(1, 0, 2)  # [nH, T, N+P]
        q_nope, q_rope = q[..., : m.qk_nope_head_dim], q[..., m.qk_nope_head_dim :]
        compressed = self._linear(h, a.kv_a, a.kv_a_bias)  # [T, R+P]
        latent = rms_norm(compressed[:, : m.kv_lora_rank], a.kv_a_norm, eps)
        k_rope = compressed[None, :, m.kv_lora_rank :]  # [1, T, P]
        rotate = Rope.apply_interleaved if m.interleaved_rope else Rope.apply
        q_rope, k_rope = rotate(q_rope, cos, sin), rotate(k_rope, cos, sin)
        latents, k_ropes = cache.append(i, latent[None], k_rope)
        q_latent = q_nope @ a.k_up  # [nH, T, R]
        mixed = attend_latent(q_latent, q_rope, latents[0], k_ropes[0], start, m.softmax_scale)  # [nH, T, R]
        out = (mixed @ a.v_up.transpose(0, 2, 1)).transpose(1, 0, 2).reshape(t, -1)  # [T, nH*V]
        return self._linear(out, a.o, a.o_bias)

    def _linear(self, x: np.ndarray, weight: np.ndarray | PackedMatrix, bias: np.ndarray | None = None) -> np.ndarray:
        """``linear`` for a resident matrix: with int8 activations where ``resident_weights`` made it int4."""
        return linear(x, weight, bias, self.resident_int8)

    def _mlp(self, i: int, layer: Layer, h: np.ndarray) -> np.ndarray:
        decode = h.shape[0] == 1
        if layer.dense is not None:
            if decode and layer.dense_expert is not None:
                return routed_experts(h[0], [layer.dense_expert], _ONE, self.resident_int8)[None]
            return swiglu(h, *layer.dense, self.resident_int8)
        routing = self.route(i, h)
        if self.route_observer is not None:
            self.route_observer(i, h, routing)
        experts = np.unique(routing.experts).tolist()
        self.store.request(i, experts)
        self.store.route_done(i, h, routing.experts, routing.probs)
        int8 = self.config.activations == "int8"
        if decode and self.store.packed:  # one compiled call for the token's experts
            datas = self.store.get_all(i, experts)
            weights = routing.weights[0, np.argsort(routing.experts[0])]  # as ``experts``: ascending ids
            if routed_experts_supported(datas):
                out = routed_experts(h[0], datas, weights, int8)[None]
            else:
                out = np.zeros_like(h)
                for weight, data in zip(weights, datas, strict=True):
                    out += expert_mlp(h, data, int8) * weight
        else:
            out = np.zeros_like(h)
            for expert in experts:
                rows, slots = np.nonzero(routing.experts == expert)
                weight = routing.weights[rows, slots, None]
                out[rows] += expert_mlp(h[rows], self.store.get(i, expert), int8) * weight
        if layer.shared_expert is not None:
            gate = None if layer.shared_expert_gate is None else sigmoid(h @ layer.shared_expert_gate.T)  # [T, 1]
            if decode and layer.shared_expert_one is not None:
                weight = _ONE if gate is None else gate[0]
                out += routed_experts(h[0], [layer.shared_expert_one], weight, self.resident_int8)
            else:
                shared = swiglu(h, *layer.shared_expert, self.resident_int8)
                out += shared if gate is None else gate * shared
        return out

    def router_scores(self, layer: int, h: np.ndarray) -> np.ndarray:
        """[T, E]: what ``layer``'s router ranks its experts by for inputs ``h``: softmax probabilities, or under
        the grouped sigmoid router the biased scores, -inf outside each token's best groups."""
        mine = self.layers[layer]
        return router_scores_of(linear(h, mine.router), self.spec.grouped_router, mine.router_bias)

    def route(self, layer: int, h: np.ndarray) -> Routing:
        """Rank the E experts by ``router_scores``, keep the top k (Shazeer et al. 2017); their weights are the
        probabilities (or the grouped router's unbiased sigmoid scores times its scaling), optionally
        renormalised.

        With ``cache_routing_tolerance`` > 0, experts within that score of the k-th best compete for the
        places not taken by clearly better ones, those already in RAM first.
        """
        k, grouped = self.spec.top_k, self.spec.grouped_router
        probs = self.router_scores(layer, h)  # [T, E]
        if self.config.cache_routing_tolerance > 0:
            tolerance, resident = self.config.cache_routing_tolerance, self.store.resident(layer)
            experts = prefer_resident(probs, np.argsort(-probs, axis=-1, kind="stable"), k, tolerance, resident)
        else:
            experts = _top_k(probs, k)
        if grouped is None:
            weights = _routing_weights(probs, experts, _NONE, self.spec.norm_topk_prob, 0.0, 1.0)
        else:  # the bias steers the choice only
            bias, scaling = self.layers[layer].router_bias, grouped.routed_scaling_factor
            weights = _routing_weights(probs, experts, bias, self.spec.norm_topk_prob, 1e-20, scaling)
        return Routing(experts, weights, probs)


_NONE = np.zeros(0, np.float32)  # an absent weight or bias, for compiled code that takes arrays only
_ONE = np.ones(1, np.float32)  # the weight of a lone expert


def one_expert(mlp: tuple[np.ndarray | PackedMatrix, np.ndarray | PackedMatrix] | None) -> PackedExpert | None:
    """A resident MLP (gate_up, down) as the decode kernel takes an expert, if it can: at decode one compiled call
    instead of two matrix products and numpy's SwiGLU between them."""
    if mlp is None or not all(isinstance(m, PackedMatrix) for m in mlp):
        return None
    expert = PackedExpert((mlp[0],), mlp[1], None)
    return expert if routed_experts_supported([expert]) else None


def router_scores_of(logits: np.ndarray, grouped: GroupedSigmoidRouter | None, bias: np.ndarray | None) -> np.ndarray:
    """[T, E]: what a router ranks its experts by, from its logits (``Decoder.router_scores``; the transformers
    trace backend scores the logits transformers computed with it too)."""
    if grouped is None:
        return softmax(logits)
    return _best_groups(sigmoid(logits) + bias, grouped.n_group, grouped.topk_group)


@njit(cache=True)
def _top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Each row's k largest, best first, ties to the lower index (as a stable argsort of -probs ranks them)."""
    experts = np.empty((probs.shape[0], k), np.int64)
    taken = np.empty(probs.shape[1], np.bool_)
    for t in range(probs.shape[0]):
        row = probs[t]
        taken[:] = False
        for slot in range(k):
            best = -1
            for e in range(len(row)):
                if not taken[e] and (best < 0 or row[e] > row[best]):
                    best = e
            experts[t, slot] = best
            taken[best] = True
    return experts


@njit(cache=True)
def _routing_weights(probs, experts, bias, normalize, eps, scaling):
    """The chosen experts' scores [T, k], less the choice-only ``bias`` (if any), optionally normalised to sum 1
    (+ ``eps``), times ``scaling``."""
    weights = np.empty(experts.shape, probs.dtype)
    for t in range(experts.shape[0]):
        for slot in range(experts.shape[1]):
            e = experts[t, slot]
            weights[t, slot] = probs[t, e] - bias[e] if len(bias) else probs[t, e]
        if normalize:
            weights[t] /= weights[t].sum() + np.float32(eps)
        weights[t] *= np.float32(scaling)
    return weights


@njit(cache=True)
def _best_groups(choice: np.ndarray, n_group: int, topk_group: int) -> np.ndarray:
    """``choice`` [T, E] with -inf outside each token's ``topk_group`` best of ``n_group`` expert groups, a group
    scored by the sum of its two best (ties: the lower group first)."""
    tokens, experts = choice.shape
    size = experts // n_group
    out = np.full_like(choice, -np.inf)
    scores = np.empty(n_group, choice.dtype)
    for t in range(tokens):
        for g in range(n_group):
            first = second = -np.inf
            for value in choice[t, g * size : (g + 1) * size]:
                if value > first:
                    first, second = value, first
                elif value > second:
                    second = value
            scores[g] = second + first
        for g in np.argsort(-scores, kind="mergesort")[:topk_group]:
            out[t, g * size : (g + 1) * size] = choice[t, g * size : (g + 1) * size]
    return out


@njit(cache=True)
def prefer_resident(probs: np.ndarray, order: np.ndarray, k: int, tolerance: float, resident: np.ndarray) -> np.ndarray:
    """Cache-aware routing: each token's k experts [T, k], best first, given its router probabilities [T, E] (or
    the best few of them, the rest zero) in ``order`` [T, R] (best first); experts within ``tolerance`` of the
    k-th best compete for the places not taken by clearly better ones, those ``resident`` ([E] bool) first."""
    margin = np.float32(tolerance)  # as numpy compares float32 scores with a Python float
    experts = np.empty((len(order), k), np.int64)
    for t in range(len(order)):
        p, o, chosen = probs[t], order[t], experts[t]
        kth = p[o[k - 1]]
        taken = 0
        for e in o[:k]:
            if p[e] > kth + margin:
                chosen[taken] = e
                taken += 1
        for wanted in (True, False):  # the close ones, resident first; with the k-th itself, k in all
            for e in o:
                if taken < k and abs(p[e] - kth) <= margin and resident[e] == wanted:
                    chosen[taken] = e
                    taken += 1
        chosen[:] = chosen[np.argsort(-p[chosen], kind="mergesort")]
    return experts


def _stacked(matrices: list[np.ndarray | PackedMatrix]) -> np.ndarray | PackedMatrix:
    """Matrices of the same input stacked by rows: packed if all are, else float32."""
    if all(isinstance(m, PackedMatrix) for m in matrices):
        data = np.concatenate([m.data for m in matrices])  # type: ignore[union-attr]
        return PackedMatrix("bf16", data.shape, 0, data, np.empty(0, np.float32))
    return np.concatenate([dequantize(m) if isinstance(m, PackedMatrix) else m for m in matrices])


def build_decoder(spec: DecoderSpec, ckpt: Checkpoint, config: EngineConfig) -> Decoder:
    """Read the resident weights, locate (but do not read) every expert, and check all shapes."""
    s = spec
    h, d = s.hidden_size, s.head_dim
    q_dim, kv_dim = s.num_heads * d, s.num_kv_heads * d
    q_out = 2 * q_dim if s.attention_output_gate else q_dim
    base = model_prefix(ckpt)

    fp8_block = s.quantization.group_size if s.quantization and s.quantization.format == "fp8" else 0

    def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return ckpt.read(name, shape, fp8_block)

    def maybe(name: str, shape: tuple[int, ...], present: bool) -> np.ndarray | None:
        return read(name, shape) if present else None

    def norm(name: str, shape: tuple[int, ...]) -> np.ndarray:
        weight = read(name, shape)
        return weight + 1.0 if s.zero_centered_norms else weight

    def matrix(name: str, shape: tuple[int, int]) -> np.ndarray | PackedMatrix:
        return ckpt.read_matrix(name, shape, fp8_block)

    def resident(name: str, m: np.ndarray | PackedMatrix) -> np.ndarray | PackedMatrix:
        return _resident(m, config.resident_weights, ckpt.path, name)

    def resident_matrix(name: str, shape: tuple[int, int]) -> np.ndarray | PackedMatrix:
        return resident(name, matrix(name, shape))

    def resident_read(name: str, shape: tuple[int, int]) -> np.ndarray | PackedMatrix:
        return resident(name, read(name, shape))

    def mlp(prefix: str, inter: int) -> tuple[np.ndarray | PackedMatrix, np.ndarray | PackedMatrix]:
        gate_up = _stacked([matrix(f"{prefix}.{n}_proj.weight", (inter, h)) for n in ("gate", "up")])
        return resident(f"{prefix}.gate_up_proj", gate_up), resident_matrix(f"{prefix}.down_proj.weight", (h, inter))

    norm_shapes = {"per_head": ((d,), (d,)), "full": ((q_dim,), (kv_dim,))}
    repacked = is_repacked(ckpt.path)
    layouts = repacked_layouts(load_manifest(ckpt.path)) if repacked else {}
    layers = []
    for i in range(s.num_layers):
        p = f"{base}.layers.{i}"
        attention: Attention | LatentAttentionWeights | DeltaNetWeights
        if s.latent_attention is not None:
            attention = _latent_attention_weights(read, maybe, resident_matrix, f"{p}.self_attn", s)
        elif s.linear_layers and s.linear_layers[i]:
            attention = _delta_net_weights(read, resident_read, f"{p}.linear_attn", s)
        else:
            qn, kn = norm_shapes.get(s.qk_norm, (None, None))
            rows = {"q": q_out, "k": kv_dim, "v": kv_dim}
            attention = Attention(
                qkv=resident(
                    f"{p}.self_attn.qkv_proj",
                    _stacked([matrix(f"{p}.self_attn.{n}_proj.weight", (r, h)) for n, r in rows.items()]),
                ),
                o=resident_matrix(f"{p}.self_attn.o_proj.weight", (h, q_dim)),
                qkv_bias=np.concatenate([read(f"{p}.self_attn.{n}_proj.bias", (r,)) for n, r in rows.items()])
                if s.qkv_bias
                else None,
                o_bias=maybe(f"{p}.self_attn.o_proj.bias", (h,), s.o_bias),
                q_norm=None if qn is None else norm(f"{p}.self_attn.q_norm.weight", qn),
                k_norm=None if kn is None else norm(f"{p}.self_attn.k_norm.weight", kn),
            )
        router = router_bias = dense = shared = shared_gate = None
        if s.sparse_layers[i]:
            moe = moe_prefix(ckpt, p, s)
            router = matrix(f"{moe}.gate.weight", (s.num_experts, h))
            router_bias = maybe(f"{moe}.gate.e_score_correction_bias", (s.num_experts,), s.grouped_router is not None)
            if not repacked:
                experts = locate_experts(
                    ckpt, f"{moe}.experts", s.num_experts, h, s.moe_intermediate_size, s.expert_names,
                    s.quantization,
                )  # fmt: skip
                layouts.update({(i, e): layout for e, layout in experts.items()})
            if s.shared_expert_intermediate_size:
                shared = mlp(f"{moe}.{s.shared_expert_name}", s.shared_expert_intermediate_size)
                shared_gate = maybe(f"{moe}.shared_expert_gate.weight", (1, h), s.shared_expert_gated)
        else:
            dense = mlp(f"{p}.mlp", s.dense_intermediate_size)
        layers.append(
            Layer(
                norm(f"{p}.input_layernorm.weight", (h,)),
                norm(f"{p}.post_attention_layernorm.weight", (h,)),
                attention,
                router,
                dense,
                shared,
                shared_gate,
                router_bias,
                one_expert(dense),
                one_expert(shared),
            )
        )
    embed = read(f"{base}.embed_tokens.weight", (s.vocab_size, h))
    lm_head = embed if s.tie_word_embeddings else read(MODEL_PREFIXES[base], (s.vocab_size, h))
    if config.activations == "int8":
        _check_int8_activations(ckpt.path, layouts)
    store = ExpertStore(layouts, h, s.moe_intermediate_size, config, s.num_layers, s.top_k)
    decoder = Decoder(s, config, ckpt, store, layers, embed, norm(f"{base}.norm.weight", (h,)), lm_head)
    store.router_scores = decoder.router_scores
    return decoder


def _resident(m: np.ndarray | PackedMatrix, format: str, path: Path, name: str) -> np.ndarray | PackedMatrix:
    """A resident matrix as ``resident_weights`` asks: as read, or quantized to ``format`` (int4 in groups of
    ``RESIDENT_GROUP_SIZE``) from its float32 values."""
    if format == "original":
        return m
    w = dequantize(m) if isinstance(m, PackedMatrix) else m
    if format == "int4" and w.shape[1] % RESIDENT_GROUP_SIZE:
        raise ConfigError(
            path,
            f"resident_weights = int4 quantizes in groups of {RESIDENT_GROUP_SIZE} columns, but {name} has "
            f"{w.shape[1]}: set resident_weights = int8 or original",
            field="resident_weights",
        )
    return quantize(w, format, RESIDENT_GROUP_SIZE)


def _check_int8_activations(path: Path, layouts: dict[tuple[int, int], ExpertLayout]) -> None:
    """``activations = "int8"`` needs every expert in int4 with groups that ``int8_activations`` supports."""
    stored = set()
    for layout in layouts.values():
        if layout.repacked is not None:
            stored |= {(m.format, m.group_size) for m in (layout.repacked.gate_up, layout.repacked.down)}
        else:
            stored |= {(r.format, r.group_size) if r.scales is not None else (r.dtype, 0) for r in layout.ranges}
    wrong = [(f, g) for f, g in stored if f not in INT4_FORMATS.values() or not int8_supported(g)]
    unsupported = sorted(f"{f} in groups of {g}" if g else f for f, g in wrong)
    if unsupported:
        raise ConfigError(
            path,
            f"activations = int8 needs int4 experts in groups of a multiple of {INT8_BLOCK}, but they are stored as "
            f"{', '.join(unsupported)}: set weights = int4 (group_size 32, 64 or 128) or activations = float32",
            field="activations",
        )


def _delta_net_weights(read: Callable, resident_read: Callable, prefix: str, s: DecoderSpec) -> DeltaNetWeights:
    """Its projections through ``resident_read`` (float32 as stored, or quantized by ``resident_weights``)."""
    net = s.gated_delta_net
    assert net is not None
    h, heads, value_dim = s.hidden_size, net.num_value_heads, net.num_value_heads * net.value_head_dim
    channels = 2 * net.num_key_heads * net.key_head_dim + value_dim
    return DeltaNetWeights(
        qkv=resident_read(f"{prefix}.in_proj_qkv.weight", (channels, h)),
        z=resident_read(f"{prefix}.in_proj_z.weight", (value_dim, h)),
        b=read(f"{prefix}.in_proj_b.weight", (heads, h)),
        a=read(f"{prefix}.in_proj_a.weight", (heads, h)),
        conv=read(f"{prefix}.conv1d.weight", (channels, 1, net.conv_kernel))[:, 0],
        dt_bias=read(f"{prefix}.dt_bias", (heads,)),
        decay_rate=np.exp(read(f"{prefix}.A_log", (heads,))),
        norm=read(f"{prefix}.norm.weight", (net.value_head_dim,)),
        out=resident_read(f"{prefix}.out_proj.weight", (h, value_dim)),
    )


def _latent_attention_weights(
    read: Callable, maybe: Callable, matrix: Callable, prefix: str, s: DecoderSpec
) -> LatentAttentionWeights:
    m = s.latent_attention
    assert m is not None
    h, heads = s.hidden_size, s.num_heads
    q_dim = heads * (m.qk_nope_head_dim + m.qk_rope_head_dim)
    low_rank_q = m.q_lora_rank is not None
    rank_q = m.q_lora_rank or 0
    kv_up = read(f"{prefix}.kv_b_proj.weight", (heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank))
    kv_up = kv_up.reshape(heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
    return LatentAttentionWeights(
        q=None if low_rank_q else matrix(f"{prefix}.q_proj.weight", (q_dim, h)),
        q_a=matrix(f"{prefix}.q_a_proj.weight", (rank_q, h)) if low_rank_q else None,
        q_a_bias=maybe(f"{prefix}.q_a_proj.bias", (rank_q,), low_rank_q and m.bias),
        q_a_norm=maybe(f"{prefix}.q_a_layernorm.weight", (rank_q,), low_rank_q),
        q_b=matrix(f"{prefix}.q_b_proj.weight", (q_dim, rank_q)) if low_rank_q else None,
        kv_a=matrix(f"{prefix}.kv_a_proj_with_mqa.weight", (m.kv_lora_rank + m.qk_rope_head_dim, h)),
        kv_a_bias=maybe(f"{prefix}.kv_a_proj_with_mqa.bias", (m.kv_lora_rank + m.qk_rope_head_dim,), m.bias),
        kv_a_norm=read(f"{prefix}.kv_a_layernorm.weight", (m.kv_lora_rank,)),
        k_up=np.ascontiguousarray(kv_up[:, : m.qk_nope_head_dim]),
        v_up=np.ascontiguousarray(kv_up[:, m.qk_nope_head_dim :]),
        o=matrix(f"{prefix}.o_proj.weight", (h, heads * m.v_head_dim)),
        o_bias=maybe(f"{prefix}.o_proj.bias", (h,), m.bias),
    )
