"""Weights built so that routing on topic-structured token streams looks like a trained model's.

Token v's residual stream starts as its embedding (C, R, U ~ N(0, I_H), H = hidden size):

    x0[v] = topic_weight * C[topic(v)] + R[v] + skew * U

and every router is Gaussian, W_L = tau / sqrt(H) * Z_L. Random projections of independent Gaussian
directions are independent, so expert e's router logit in layer L is, up to a common scale,

    topic_weight * A_L[e, topic(v)] + B_L[e, v] + skew * S_L[e] + (what earlier blocks wrote)

with A, B, S ~ N(0, 1):

- adjacent tokens on the same topic share the A term, so they pick overlapping experts (locality);
- S is the same for every token, so some experts win more often than others (skew);
- each attention and expert block writes only about ``drift / sqrt(2 * layers)`` into the residual stream,
  so the state changes little from one layer to the next and the next layer's router applied to the
  current state predicts that layer's choice (lookahead), as in trained models;
- ``lm_head`` row v is kappa * C[topic(v)] + logit_spread * D[v] (D ~ N(0, I_H) / sqrt(H), one row per token):
  the topic term keeps sampled generation on the current topic with probability ``locality``, so generated
  tokens continue the same topic chain as the workload's prompts; the token's own term gives every token a
  distinct row, so the next-token distribution has a trained model's entropy and top-1 margin and no exact
  ties (with the topic term alone, a topic's tokens would tie exactly and argmax would be float noise).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from engine.synth.archs import TensorSpec
from engine.synth.shapes import SynthShape

ROUTER_TAU = 2.0  # router logits' spread: sharp enough that the top-k weights differ, as trained routers' do


@dataclass(frozen=True)
class RoutingKnobs:
    """How friendly the routing is to a cache; the defaults sit inside real models' ranges (docs/synthetic.md)."""

    locality: float = 0.7  # probability that the next token keeps the current topic (prompts and generation)
    skew: float = 0.05  # weight of the direction all tokens share: how much some experts are busier than others
    topics: int = 16  # topic count; tokens are assigned round-robin, topic(v) = v % topics
    topic_weight: float = 0.25  # weight of the topic direction against the token's own
    drift: float = 1.0  # how far the residual stream moves, in total, over all layers
    logit_spread: float = 3.5  # std of each token's own logit term: sets the next-token entropy and top-1 margin

    def __post_init__(self) -> None:
        if not 0 < self.locality < 1:
            raise ValueError(f"locality must be in (0, 1) but got {self.locality}")
        if self.skew < 0:
            raise ValueError(f"skew must be >= 0 but got {self.skew}")
        if self.topics < 2:
            raise ValueError(f"topics must be at least 2 but got {self.topics}")
        if self.topic_weight < 0 or self.drift < 0:
            raise ValueError(f"topic_weight and drift must be >= 0 but got {self.topic_weight}, {self.drift}")
        if self.logit_spread < 0:
            raise ValueError(f"logit_spread must be >= 0 but got {self.logit_spread}")

    def to_dict(self) -> dict:
        return asdict(self)

    def residual_scale(self, num_layers: int) -> float:
        """Each of the 2 blocks per layer writes this much, so the total drift is about ``drift``."""
        return self.drift / math.sqrt(2 * num_layers)


# Calibrated on each architecture's default expert count (64 experts top-4, 8 experts top-2); see docs/synthetic.md.
DEFAULT_KNOBS = {
    "qwen3_moe": RoutingKnobs(),
    "mixtral": RoutingKnobs(locality=0.65, skew=0.2, topic_weight=0.6),
    "deepseek_v3": RoutingKnobs(),
    "qwen3_5_moe": RoutingKnobs(),
}


def topic_of(tokens: np.ndarray, topics: int) -> np.ndarray:
    return tokens % topics


class WeightBuilder:
    """Fills each tensor from its own seeded stream, so tensors can be built in any order or in parallel."""

    def __init__(self, shape: SynthShape, knobs: RoutingKnobs, seed: int):
        self.shape = shape
        self.knobs = knobs
        self.seed = seed
        structure = np.random.default_rng([seed, 0])
        self.topic_dirs = structure.standard_normal((knobs.topics, shape.hidden_size), np.float32)  # C
        self.shared_dir = structure.standard_normal(shape.hidden_size, np.float32)  # U
        self.vocab_topics = topic_of(np.arange(shape.vocab_size), knobs.topics)

    def build(self, index: int, spec: TensorSpec) -> np.ndarray:
        """Tensor number ``index`` of the checkpoint as float32."""
        rng = np.random.default_rng([self.seed, 1, index])
        k, h = self.knobs, self.shape.hidden_size
        if spec.kind == "ones":
            return np.ones(spec.dims, np.float32)
        if spec.kind == "zeros":
            return np.zeros(spec.dims, np.float32)
        if spec.kind == "normal":
            values = rng.standard_normal(spec.dims, np.float32)
            values *= spec.std
            return values
        if spec.kind == "router":
            values = rng.standard_normal(spec.dims, np.float32)
            values *= ROUTER_TAU / math.sqrt(h)
            return values
        if spec.kind == "embed":
            values = rng.standard_normal(spec.dims, np.float32)
            values += k.topic_weight * self.topic_dirs[self.vocab_topics]
            values += k.skew * self.shared_dir
            return values
        if spec.kind == "lm_head":
            values = rng.standard_normal(spec.dims, np.float32)
            values *= k.logit_spread / math.sqrt(h)
            values += self.lm_head_scale() / h * self.topic_dirs[self.vocab_topics]
            return values
        raise ValueError(f"unknown tensor kind {spec.kind!r} for {spec.name}")

    def lm_head_scale(self) -> float:
        """kappa such that the current topic's tokens together get probability ``locality``.

        The tokens' own terms multiply every topic's total by the same e^(logit_spread^2 / 2) in expectation,
        so they leave this ratio as it is.

        The final state's topic component is C[t] * topic_weight / rms, with rms^2 about
        topic_weight^2 + 1 + skew^2 + drift^2; so its topic's logit is kappa * topic_weight / rms, the
        others' about 0, and P(same topic) = e^z / (e^z + topics - 1) solves to the log below.
        """
        k = self.knobs
        if k.topic_weight == 0:
            return 0.0
        rms = math.sqrt(k.topic_weight**2 + 1 + k.skew**2 + k.drift**2)
        return rms / k.topic_weight * math.log(k.locality * (k.topics - 1) / (1 - k.locality))


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """The stored bytes of float32 ``values``. bf16 keeps the high half of each float32 (truncation):
    the checkpoint's weights are by definition the stored values, and one strided copy is the fastest way."""
    values = np.ascontiguousarray(values, np.float32)
    if dtype == "fp32":
        return values
    if dtype == "fp16":
        return values.astype(np.float16)
    return np.ascontiguousarray(values.reshape(-1).view(np.uint16)[1::2])  # little-endian: the high half is second
