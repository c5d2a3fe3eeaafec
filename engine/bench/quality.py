"""Output quality against a reference run: original weights, every routed expert, no approximation.

Both runs score the same tokens teacher-forced (the reference's own generation, for generate workloads), so
the comparison is position by position: top-1 agreement, mean KL(reference || config) of the next-token
distributions, and the perplexity of the scored tokens under each. Top-1 agreement counts only positions
where the reference's two likeliest tokens are at least ``TOP1_MIN_GAP`` nats apart: where they (nearly) tie,
which one wins is float rounding, not damage, and depends on the CPU, the BLAS and the thread count. The share
of positions left out is reported beside it. References are cached by a key that changes when the model's
files, the workload or this protocol change.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REFERENCE_PROTOCOL = 1  # bump when what a reference holds, or how it is computed, changes
TOP1_MIN_GAP = 1e-3  # nats between the reference's top two: 100x float32's rounding of a logit of ~10


@dataclass(frozen=True)
class Quality:
    top1: float | None  # share of decided positions where both runs' likeliest next token agree (None: none decided)
    top1_excluded: float  # share of positions left out of top1: the reference's top two within TOP1_MIN_GAP
    kl: float  # mean KL(reference || config) in nats per position
    perplexity: float
    reference_perplexity: float

    @property
    def perplexity_delta(self) -> float:
        return self.perplexity - self.reference_perplexity

    def to_dict(self) -> dict:
        return asdict(self) | {"perplexity_delta": self.perplexity_delta}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(reference_logp: np.ndarray, logp: np.ndarray, tokens: np.ndarray) -> Quality:
    """Compare log-probabilities [T, V] of the same ``tokens`` [T] (row t predicts token t + 1)."""
    if reference_logp.shape != logp.shape or len(tokens) != len(logp):
        raise ValueError(f"shapes differ: reference {reference_logp.shape}, run {logp.shape}, tokens {len(tokens)}")
    kl = np.sum(np.exp(reference_logp) * (reference_logp - logp), axis=-1)
    top1, excluded = top1_agreement(reference_logp, logp)
    return Quality(
        top1=top1,
        top1_excluded=excluded,
        kl=float(np.mean(kl)),
        perplexity=perplexity(logp, tokens),
        reference_perplexity=perplexity(reference_logp, tokens),
    )


def top1_agreement(reference: np.ndarray, other: np.ndarray) -> tuple[float | None, float]:
    """Share of the positions the reference decides (top two at least TOP1_MIN_GAP apart) where ``other``'s
    likeliest token is the reference's, and the share of positions left out. Logits or log-probabilities [T, V]."""
    decided = top2_gap(reference) >= TOP1_MIN_GAP
    agree = reference.argmax(-1) == other.argmax(-1)
    return (float(np.mean(agree[decided])) if decided.any() else None), float(1 - np.mean(decided))


def top2_gap(logits: np.ndarray) -> np.ndarray:
    """Per row of ``logits`` [T, V] (or log-probabilities), the likeliest entry's margin over the second's."""
    top2 = np.partition(logits, -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def perplexity(logp: np.ndarray, tokens: np.ndarray) -> float:
    nll = -logp[np.arange(len(tokens) - 1), tokens[1:]]
    return float(np.exp(nll.mean()))


def reference_key(model_identity: dict, workload_name: str, workload_version: int) -> str:
    """A workload's tokens are fixed by its name and version and the model, so these three name a reference."""
    workload = {"name": workload_name, "version": workload_version}
    document = {"protocol": REFERENCE_PROTOCOL, "model": model_identity, "workload": workload}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:24]


def reference_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "references" / f"{key}.npz"


def save_reference(path: Path, tokens: np.ndarray, logp: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, tokens=tokens.astype(np.int64), logp=logp.astype(np.float32))
    partial.replace(path)  # a killed run never leaves a half-written reference behind


def load_reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["tokens"], data["logp"].astype(np.float64)
