"""Prefill, incremental decode, sampling and teacher-forced scoring over a loaded Model."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from engine.model.layers import softmax
from engine.model.load import Model


@dataclass(frozen=True)
class Sampler:
    """Greedy when ``temperature`` is 0; otherwise temperature + nucleus (top-p, Holtzman et al. 2019)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 but got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] but got {self.top_p}")

    def picker(self) -> Callable[[np.ndarray], int]:
        """A function from logits [V] to a token id, with its own seeded random stream."""
        if self.temperature == 0:
            return lambda logits: int(np.argmax(logits))
        rng = np.random.default_rng(self.seed)

        def pick(logits: np.ndarray) -> int:
            probs = softmax(logits.astype(np.float64) / self.temperature)
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, self.top_p)) + 1]  # smallest set reaching top_p
            kept = probs[keep] / probs[keep].sum()
            return int(keep[rng.choice(len(keep), p=kept)])

        return pick


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    tokens: list[int]
    text: str | None
    prefill_seconds: float
    decode_seconds: float
    expert_bytes_read: int
    experts_loaded: int

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first (which the prefill produced) per second of decoding."""
        steps = len(self.tokens) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s}


def generate_steps(model: Model, prompt_ids: list[int], sampler: Sampler = Sampler()) -> Iterator[int]:
    """Yield generated token ids one by one, without end (the caller decides when to stop)."""
    _check_ids(model, prompt_ids)
    pick = sampler.picker()
    cache = model.decoder.new_cache()
    logits = model.decoder.forward(np.asarray(prompt_ids), cache, all_logits=False)
    while True:
        token = pick(logits[-1])
        yield token
        logits = model.decoder.forward(np.asarray([token]), cache, all_logits=False)


def generate(
    model: Model, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler = Sampler(), stop_at_eos: bool = True
) -> GenerationResult:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1 but got {max_new_tokens}")
    stats = model.decoder.store.stats
    bytes_before, loads_before = stats.bytes_read, stats.experts_loaded
    tokens: list[int] = []
    start = time.perf_counter()
    first_token_at = start
    for token in generate_steps(model, prompt_ids, sampler):
        if not tokens:
            first_token_at = time.perf_counter()
        tokens.append(token)
        if len(tokens) == max_new_tokens or (stop_at_eos and token in model.eos_token_ids):
            break
    end = time.perf_counter()
    return GenerationResult(
        prompt_ids=list(prompt_ids),
        tokens=tokens,
        text=model.decode(tokens),
        prefill_seconds=first_token_at - start,
        decode_seconds=end - first_token_at,
        expert_bytes_read=stats.bytes_read - bytes_before,
        experts_loaded=stats.experts_loaded - loads_before,
    )


def score(model: Model, ids: list[int]) -> np.ndarray:
    """Teacher-forced logits [T, V]: row t is the next-token distribution after ids[: t + 1]."""
    _check_ids(model, ids)
    return model.decoder.forward(np.asarray(ids), model.decoder.new_cache(), all_logits=True)


def _check_ids(model: Model, ids: list[int]) -> None:
    if len(ids) == 0:
        raise ValueError("the prompt must hold at least one token")
    vocab = model.decoder.spec.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
