"""Expert streaming throughput: the engine's reader alone, fetching a layer's worth of random experts at a time.

This is the I/O half of a decode step without the compute: what the reader achieves against what the disk
probe measured at the same request size and queue depth.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from engine.config import EngineConfig
from engine.formats.expert_layout import PackedExpert
from engine.model.load import load_model


def stream_throughput(
    model_dir: Path, config: EngineConfig, seconds: float, experts_per_step: int, seed: int
) -> tuple[float, int]:
    """Bytes/s of experts read by ``config``'s reader (packed, no cache), ``experts_per_step`` at a time, and the
    bytes of memory the reads landed in.

    Each step picks a random MoE layer and that many distinct random experts of it, fetches them all, and
    waits for them, as a decode step does when nothing is cached. The model's pages are dropped first.
    """
    model = load_model(model_dir, EngineConfig(**{**config.to_dict(), "cache_format": "packed"}))
    try:
        store = model.decoder.store
        reader = store.reader
        layers = sorted({layer for layer, _ in store.layouts})
        experts = model.decoder.spec.num_experts
        model.drop_cached_pages()
        rng = np.random.default_rng(seed)
        done = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            layer = int(rng.choice(layers))
            chosen = rng.choice(experts, experts_per_step, replace=False)
            fetches = [reader.fetch(store.layouts[(layer, int(e))], None) for e in chosen]
            for fetch in fetches:
                data = fetch.wait()
                done += fetch.bytes_read
                if isinstance(data, PackedExpert) and data.buffer is not None:
                    reader.give_slot(data.buffer)
        return done / (time.perf_counter() - start), experts_per_step * reader.slots.slot_bytes
    finally:
        model.close()
