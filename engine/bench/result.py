"""BenchResult: one benchmark of one engine configuration, as plain JSON-able data with a schema version.

Metrics that do not apply to a configuration (a cache hit rate without a cache, prefetch precision
without a predictor) are None, never 0.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.config import EngineConfig
from engine.units import format_bytes

# 4: cached_experts_per_layer; 3: quality_top1 over decided positions, quality_top1_excluded;
# 2: prefetch_timeliness
SCHEMA_VERSION = 4


@dataclass
class BenchResult:
    schema_version: int
    created_at: str  # UTC, ISO 8601
    engine: dict  # package version and git commit
    machine: dict
    model: dict
    workload: dict
    config: dict
    memory_limit: dict  # bytes, enforced, mechanism or the reason it was not enforced
    cold: dict  # requested, enforced (page cache dropped before each repeat), reason
    repeats: int
    decode_tok_s: float | None  # median over repeats
    decode_tok_s_ci: tuple[float, float] | None  # 95% bootstrap interval of that median
    decode_tok_s_slowest_window: float | None
    window_seconds: float | None
    prefill_tok_s: float | None
    ttft_s: float | None
    hit_rate: float | None
    cached_experts_per_layer: float | None  # what the cache budget holds under the config's cache_format
    bytes_read_per_token: float | None  # expert bytes the engine asked for, per decoded token
    disk_bytes_per_token: float | None  # bytes that really came from storage (Linux), per decoded token
    read_gbps: float | None  # disk bytes over decode time
    io_stall_frac: float | None  # share of decode time the compute spent waiting for expert reads
    compute_s_per_token: float | None  # decode time not spent waiting for reads
    prefetch_precision: float | None  # prefetched experts that were used, over those prefetched
    prefetch_recall: float | None  # cache misses a prefetch covered, over all cache misses
    prefetch_timeliness: float | None  # used prefetches that had arrived when needed, over those used
    wasted_bytes_per_token: float | None  # bytes read for prefetches nobody used
    peak_rss_bytes: int | None
    memory_peak_bytes: int | None  # the budget's own accounting (cgroup peak, page cache included)
    quality_top1: float | None  # over the positions the reference decides (engine/bench/quality.py)
    quality_top1_excluded: float | None  # share of positions where the reference's top two nearly tie
    quality_kl: float | None
    quality_ppl_delta: float | None
    roofline_tok_s: float | None  # disk bytes per token over the probed bandwidth
    roofline: dict | None  # the probe cell used: request size, queue depth, bandwidth
    efficiency: float | None  # decode_tok_s / roofline_tok_s
    per_repeat: list[dict] = field(default_factory=list)
    quality: dict | None = None
    vs: dict | None = None  # --vs: the other configuration's result and the speed ratio with its interval

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        """A markdown table for people (the JSON is for machines)."""
        rows = [
            ("model", f"{self.model['path']} ({format_bytes(self.model['weight_bytes'])})"),
            ("workload", f"{self.workload['name']} v{self.workload['version']}"),
            ("config", json.dumps(self.config) or "{}"),
            ("memory limit", _limit(self.memory_limit)),
            ("cold", "yes" if self.cold["enforced"] else f"no ({self.cold['reason']})"),
            ("repeats", str(self.repeats)),
        ]
        if self.decode_tok_s is not None:
            low, high = self.decode_tok_s_ci or (float("nan"), float("nan"))
            rows += [
                ("decode tok/s", f"{self.decode_tok_s:.2f} [{low:.2f}, {high:.2f}] (95% CI)"),
                ("slowest window", f"{self.decode_tok_s_slowest_window:.2f} tok/s over {self.window_seconds:.1f} s"),
            ]
        rows += [
            ("prefill tok/s", _num(self.prefill_tok_s)),
            ("time to first token", _num(self.ttft_s, " s")),
            ("expert bytes / token", _bytes(self.bytes_read_per_token)),
            ("disk bytes / token", _bytes(self.disk_bytes_per_token)),
            ("cache holds", _held(self.cached_experts_per_layer, self.config)),
            ("hit rate", _num(self.hit_rate and 100 * self.hit_rate, " %", 1)),
            ("prefetch precision", _num(self.prefetch_precision and 100 * self.prefetch_precision, " %", 1)),
            ("prefetch recall", _num(self.prefetch_recall and 100 * self.prefetch_recall, " %", 1)),
            ("prefetch timeliness", _num(self.prefetch_timeliness and 100 * self.prefetch_timeliness, " %", 1)),
            ("wasted bytes / token", _bytes(self.wasted_bytes_per_token)),
            ("read bandwidth", _num(self.read_gbps, " GB/s", 3)),
            ("I/O stall", _num(self.io_stall_frac and 100 * self.io_stall_frac, " %", 1)),
            ("compute / token", _num(self.compute_s_per_token and 1000 * self.compute_s_per_token, " ms")),
            ("roofline tok/s", _num(self.roofline_tok_s)),
            ("efficiency", _num(self.efficiency and 100 * self.efficiency, " %", 1)),
            ("peak RSS", _bytes(self.peak_rss_bytes)),
            ("memory peak (budget)", _bytes(self.memory_peak_bytes)),
            ("quality top-1", _num(self.quality_top1, "", 4)),
            ("top-1 near-ties left out", _num(self.quality_top1_excluded and 100 * self.quality_top1_excluded, " %")),
            ("quality KL", _num(self.quality_kl, " nats", 5)),
            ("perplexity delta", _num(self.quality_ppl_delta, "", 4)),
        ]
        if self.vs is not None:
            ratio, low, high = self.vs["ratio"], *self.vs["ratio_ci"]
            rows.append(("vs other config", f"{ratio:.3f}x [{low:.3f}, {high:.3f}] decode tok/s ratio"))
        width = max(len(k) for k, _ in rows)
        lines = [f"| {'metric':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
        lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
        return "\n".join(lines)


def _num(value: float | None, unit: str = "", digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def _held(experts: float | None, values: dict) -> str:
    config = EngineConfig.from_dict(values)
    if experts is None or config.cache_policy == "none":
        return "nothing (no cache)"
    shared = " on average" if config.cache_scope == "global" else ""
    return f"{experts:.3g} experts per MoE layer{shared}, as {config.cache_format}"


def _bytes(value: float | None) -> str:
    return "n/a" if value is None else format_bytes(value)


def _limit(limit: dict) -> str:
    if limit["bytes"] is None:
        return "none"
    state = f"enforced ({limit['mechanism']})" if limit["enforced"] else f"NOT enforced: {limit['reason']}"
    return f"{format_bytes(limit['bytes'])}, {state}"
