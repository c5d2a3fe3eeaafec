"""Output quality against a reference run: original weights, every routed expert, no approximation.

Both runs score the same tokens teacher-forced (the reference's own generation, for generate workloads), so
the comparison is position by position: top-1 agreement, mean KL(reference || config) of the next-token
distributions, and the perplexity of the scored tokens under each. References are cached by a key that
changes when the model's files, the workload or this protocol change.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REFERENCE_PROTOCOL = 1  # bump when what a reference holds, or how it is computed, changes


@dataclass(frozen=True)
class Quality:
    top1: float  # share of positions where both runs' most likely next token agree
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
    return Quality(
        top1=float(np.mean(reference_logp.argmax(-1) == logp.argmax(-1))),
        kl=float(np.mean(kl)),
        perplexity=perplexity(logp, tokens),
        reference_perplexity=perplexity(reference_logp, tokens),
    )


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
