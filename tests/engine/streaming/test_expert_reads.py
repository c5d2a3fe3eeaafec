"""A decode step reads exactly the routed experts' bytes, and nothing else of the expert weights."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import load_model
from tests.engine.safetensors_headers import independent_headers
from tests.engine.tiny_models import build


def _expected_reads(path: Path, routed: dict[int, list[int]], fused: bool) -> list[tuple[str, int, int]]:
    headers = independent_headers(path)
    reads = []
    for layer, experts in routed.items():
        prefix = f"model.layers.{layer}.mlp.experts"
        for e in experts:
            if fused:
                for name in ("gate_up_proj", "down_proj"):
                    info = headers[f"{prefix}.{name}"]
                    size = info["nbytes"] // info["shape"][0]
                    reads.append((str(info["file"]), info["start"] + e * size, size))
            else:
                for name in ("gate_proj", "up_proj", "down_proj"):
                    info = headers[f"{prefix}.{e}.{name}.weight"]
                    reads.append((str(info["file"]), info["start"], info["nbytes"]))
    return sorted(reads)


def _rchar() -> int:
    """Bytes this process has read through read-family syscalls, as the kernel counts them."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused"])
def test_decode_step_reads_exactly_the_routed_experts(tmp_path, monkeypatch, fused):
    reference, path = build("qwen3_moe", tmp_path / "ckpt", fused=fused, mlp_only_layers=[1])
    model = load_model(path)
    ids = np.random.default_rng(0).integers(0, 90, 12)

    with torch.no_grad():
        router_logits = reference(torch.from_numpy(ids)[None], output_router_logits=True).router_logits
    sparse_layers = [0, 2]  # layer 1 is dense
    top_k = reference.config.num_experts_per_tok
    routed = {
        layer: torch.topk(logits[-1], top_k).indices.tolist()
        for layer, logits in zip(sparse_layers, router_logits, strict=True)
    }

    cache = model.decoder.new_cache()
    model.decoder.forward(ids[:-1], cache)

    fd_paths = {fd: p for p, fd in model.decoder.store.reader.fds.items()}
    reads: list[tuple[str, int, int]] = []
    real_preadv = os.preadv

    def spy(fd: int, buffers: list, offset: int) -> int:
        n = real_preadv(fd, buffers, offset)
        reads.append((fd_paths[fd], offset, n))
        return n

    monkeypatch.setattr(os, "preadv", spy)
    before = model.decoder.store.stats.bytes_read
    model.decoder.forward(ids[-1:], cache)
    monkeypatch.undo()

    expected = _expected_reads(path, routed, fused)
    assert sorted(reads) == expected
    assert model.decoder.store.stats.bytes_read - before == sum(n for *_, n in expected)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/io is Linux's")
def test_kernel_counts_only_expert_bytes_for_a_decode_step(tmp_path):
    """The kernel's own read counter agrees: a decode step reads the routed experts' bytes and no more."""
    _, path = build("qwen3_moe", tmp_path / "ckpt")
    model = load_model(path)
    cache = model.decoder.new_cache()
    model.decoder.forward(np.arange(10), cache)

    probe_start = _rchar()
    probe_cost = _rchar() - probe_start  # what reading the counter itself adds
    start = _rchar()
    before = model.decoder.store.stats.bytes_read
    model.decoder.forward(np.asarray([3]), cache)
    read = _rchar() - start - probe_cost
    expert_bytes = model.decoder.store.stats.bytes_read - before

    layers, top_k = 3, 2
    one_expert = 3 * 32 * 64 * 4  # gate, up, down of [32, 64] fp32
    assert expert_bytes == layers * top_k * one_expert
    # The counter's own text can grow by a digit between probes; any stray tensor read is >= 256 bytes.
    assert abs(read - expert_bytes) <= 4
