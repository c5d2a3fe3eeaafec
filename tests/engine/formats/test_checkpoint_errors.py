"""Bad checkpoints raise the engine's own error, naming the file and the tensor or field at fault."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from engine import CheckpointError, UnsupportedModelError, load_model

SHARD = "model-00001-of-00001.safetensors"


def _rewrite_header(path: Path, mutate: Callable[[dict], None]) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    mutate(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _edit_json(path: Path, mutate: Callable[[dict], None]) -> None:
    value = json.loads(path.read_text())
    mutate(value)
    path.write_text(json.dumps(value))


def _load_error(path: Path, kind: type[CheckpointError] = CheckpointError) -> str:
    with pytest.raises(kind) as info:
        load_model(path)
    return str(info.value)


def test_truncated_file(synth_tiny):
    shard = synth_tiny / SHARD
    shard.write_bytes(shard.read_bytes()[:-100])
    message = _load_error(synth_tiny)
    assert SHARD in message and "lm_head.weight" in message and "truncated" in message


def test_header_length_beyond_file(synth_tiny):
    shard = synth_tiny / SHARD
    raw = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    message = _load_error(synth_tiny)
    assert SHARD in message and "header length" in message


def test_invalid_header_json(synth_tiny):
    shard = synth_tiny / SHARD
    raw = bytearray(shard.read_bytes())
    raw[8] = ord("x")
    shard.write_bytes(bytes(raw))
    message = _load_error(synth_tiny)
    assert SHARD in message and "not valid JSON" in message


def test_offsets_out_of_range(synth_tiny):
    def push_past_end(header: dict) -> None:
        begin, end = header["model.norm.weight"]["data_offsets"]
        header["model.norm.weight"]["data_offsets"] = [begin + 10**9, end + 10**9]

    _rewrite_header(synth_tiny / SHARD, push_past_end)
    message = _load_error(synth_tiny)
    assert SHARD in message and "'model.norm.weight'" in message and "data section" in message


def test_overlapping_offsets(synth_tiny):
    def overlap(header: dict) -> None:
        header["model.norm.weight"]["data_offsets"] = header["model.layers.0.input_layernorm.weight"]["data_offsets"]

    _rewrite_header(synth_tiny / SHARD, overlap)
    message = _load_error(synth_tiny)
    assert SHARD in message and "overlap" in message and "model.norm.weight" in message


def test_tensor_missing_from_its_shard(synth_tiny):
    _rewrite_header(synth_tiny / SHARD, lambda h: h.pop("model.layers.1.self_attn.k_proj.weight"))
    message = _load_error(synth_tiny)
    assert SHARD in message and "'model.layers.1.self_attn.k_proj.weight'" in message and "missing" in message


def test_tensor_missing_everywhere(synth_tiny):
    name = "model.layers.0.mlp.experts.5.up_proj.weight"
    _rewrite_header(synth_tiny / SHARD, lambda h: h.pop(name))
    _edit_json(synth_tiny / "model.safetensors.index.json", lambda i: i["weight_map"].pop(name))
    message = _load_error(synth_tiny)
    assert str(synth_tiny) in message and f"'{name}'" in message and "missing" in message


def test_index_names_a_missing_shard(synth_tiny):
    _edit_json(
        synth_tiny / "model.safetensors.index.json",
        lambda i: i["weight_map"].__setitem__("model.norm.weight", "model-00009.safetensors"),
    )
    message = _load_error(synth_tiny)
    assert "model.safetensors.index.json" in message and "model-00009.safetensors" in message


def test_wrong_shape(synth_tiny):
    _rewrite_header(synth_tiny / SHARD, lambda h: h["model.norm.weight"].__setitem__("shape", [8, 8]))
    message = _load_error(synth_tiny)
    assert SHARD in message and "'model.norm.weight'" in message and "[8, 8]" in message and "[64]" in message


def test_wrong_dtype(synth_tiny):
    _rewrite_header(synth_tiny / SHARD, lambda h: h["model.norm.weight"].__setitem__("dtype", "I32"))
    message = _load_error(synth_tiny)
    assert SHARD in message and "'model.norm.weight'" in message and "I32" in message


def test_expert_with_wrong_shape(synth_tiny):
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    _rewrite_header(synth_tiny / SHARD, lambda h: h[name].__setitem__("shape", [32, 64]))
    message = _load_error(synth_tiny)
    assert f"'{name}'" in message and "[32, 64]" in message


def test_unknown_architecture(synth_tiny):
    _edit_json(synth_tiny / "config.json", lambda c: c.__setitem__("model_type", "llama4"))
    message = _load_error(synth_tiny, UnsupportedModelError)
    assert "config.json" in message and "'model_type'" in message and "llama4" in message


def test_unknown_config_key(synth_tiny):
    _edit_json(synth_tiny / "config.json", lambda c: c.__setitem__("expert_magic", 3))
    message = _load_error(synth_tiny, UnsupportedModelError)
    assert "config.json" in message and "'expert_magic'" in message


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("hidden_act", "gelu", "not supported"),
        ("num_experts_per_tok", "two", "expected int"),
        ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "dynamic"),
        ("mlp_only_layers", [7], "layer indices"),
    ],
)
def test_unsupported_config_value(synth_tiny, field, value, words):
    _edit_json(synth_tiny / "config.json", lambda c: c.__setitem__(field, value))
    message = _load_error(synth_tiny, UnsupportedModelError)
    assert "config.json" in message and f"'{field}'" in message and words in message


def test_missing_config(synth_tiny):
    (synth_tiny / "config.json").unlink()
    assert "config.json" in _load_error(synth_tiny)


def test_missing_directory(tmp_path):
    assert "not a checkpoint directory" in _load_error(tmp_path / "nothing")
