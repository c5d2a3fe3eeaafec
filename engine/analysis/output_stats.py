"""Next-token distribution statistics, beside trained language models' published figures.

A synthetic checkpoint's output distribution decides what quality metrics can see: with tied logits, top-1
agreement measures float rounding, not damage. Targets (sources in docs/synthetic.md):

- entropy: base LMs' cross-entropy on ordinary text, 1.2-2.5 nats per token (Llama-2-70B 1.20 to
  Llama-4-Scout 2.20 and OLMoE 2.5), which a calibrated model's mean predictive entropy matches;
- top-1 probability: greedy next-token accuracy on OpenWebText, 0.42 (GPT-3 ada) to 0.56 (davinci);
- near-ties: the share of positions whose top two logits are within 1e-4 of the logits' spread, which
  float rounding can swap. A trained model's are essentially nil; ours must stay under 0.1%.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from engine.bench.quality import log_softmax, top2_gap

REFERENCE_RANGES = {
    "entropy_nats": (1.2, 2.5),
    "top1_probability": (0.42, 0.56),
    "near_tie_share": (0.0, 0.001),
}
NEAR_TIE = 1e-4  # of the logits' standard deviation over the vocabulary, at that position


@dataclass(frozen=True)
class OutputStats:
    positions: int
    entropy_nats: float  # mean entropy of the next-token distribution
    top1_probability: float  # mean probability of the likeliest next token
    top2_gap_median: float  # median margin of the likeliest logit over the second, in nats
    near_tie_share: float  # positions whose top-2 gap is under NEAR_TIE of their logits' spread

    def to_dict(self) -> dict:
        return asdict(self)

    def outside_reference(self) -> dict[str, float]:
        values = asdict(self)
        return {name: values[name] for name, (low, high) in REFERENCE_RANGES.items() if not low <= values[name] <= high}


def output_stats(logits: np.ndarray) -> OutputStats:
    """Statistics of next-token ``logits`` [T, V]."""
    logp = log_softmax(logits)
    p = np.exp(logp)
    gap = top2_gap(logits.astype(np.float64))
    spread = logits.astype(np.float64).std(axis=-1)
    return OutputStats(
        positions=len(logits),
        entropy_nats=float(-(p * logp).sum(-1).mean()),
        top1_probability=float(p.max(-1).mean()),
        top2_gap_median=float(np.median(gap)),
        near_tie_share=float(np.mean(gap < NEAR_TIE * spread)),
    )


def format_table(stats: OutputStats) -> str:
    """Markdown: each statistic beside the range trained models show."""
    values = stats.to_dict()
    lines = ["| output statistic | value | trained models |", "|---|---|---|"]
    for name, (low, high) in REFERENCE_RANGES.items():
        lines.append(f"| {name} | {values[name]:.4g} | {low:g}-{high:g} |")
    lines.append(f"| top2_gap_median | {stats.top2_gap_median:.3g} | |")
    return "\n".join(lines)
