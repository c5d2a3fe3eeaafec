"""The repacked layout: experts bit-exact or within their format's bound, aligned ranges, a strict manifest."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.errors import CheckpointError
from engine.formats import quant
from engine.formats.checkpoint import Checkpoint
from engine.formats.repack import repack
from engine.formats.repack_manifest import ExpertEntry, is_repacked, load_manifest, unpack_expert
from engine.synth import PRESETS, SynthShape, synthesize
from tests.engine.safetensors_headers import independent_headers
from tests.engine.tiny_models import build

NUM_EXPERTS = 8  # every tiny checkpoint here
EXPERT_NAMES = {"mlp": ("gate_proj", "up_proj", "down_proj"), "block_sparse_moe": ("w1", "w3", "w2")}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per-expert tensors, two MoE layers."""
    return synthesize(tmp_path_factory.mktemp("synth") / "m", PRESETS["tiny"], dtype="bf16")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mixtral's names: ``block_sparse_moe.experts.{e}.w1/w3/w2``."""
    shape = SynthShape("mixtral", 64, 2, 4, 2, 16, NUM_EXPERTS, 2, 32, 512)
    return synthesize(tmp_path_factory.mktemp("mixtral") / "m", shape, dtype="bf16")


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fused [E, 2I, H] / [E, H, I] tensors as transformers 5 saves them; layer 1 is a dense MLP."""
    _, path = build(
        "qwen3_moe", tmp_path_factory.mktemp("fused") / "m", dtype=torch.bfloat16, fused=True, mlp_only_layers=[1]
    )
    return path


@pytest.fixture(scope="module")
def repacked(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("repacked") / "out"
    repack(synth, out, "bf16")
    return out


def _tensor_bytes(info: dict[str, Any]) -> bytes:
    with open(info["file"], "rb") as f:
        f.seek(info["start"])
        return f.read(info["nbytes"])


def _source_expert(model: Path, layer: int, expert: int) -> tuple[bytes, bytes]:
    """The bf16 bytes of (gate_up, down) of one expert, in either layout."""
    headers = independent_headers(model)
    block = next(b for b in EXPERT_NAMES if f"model.layers.{layer}.{b}.gate.weight" in headers)
    prefix = f"model.layers.{layer}.{block}.experts"
    if f"{prefix}.gate_up_proj" in headers:
        pieces = []
        for name in ("gate_up_proj", "down_proj"):
            raw = _tensor_bytes(headers[f"{prefix}.{name}"])
            size = len(raw) // NUM_EXPERTS
            pieces.append(raw[expert * size : (expert + 1) * size])
        return pieces[0], pieces[1]
    gate, up, down = (_tensor_bytes(headers[f"{prefix}.{expert}.{n}.weight"]) for n in EXPERT_NAMES[block])
    return gate + up, down


def _widen(raw: bytes, shape: tuple[int, int]) -> np.ndarray:
    return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)


def _expert_range(out: Path, entry: ExpertEntry) -> np.ndarray:
    return np.fromfile(out / entry.file, np.uint8, count=entry.nbytes, offset=entry.offset)


def _bound(p: quant.PackedMatrix, w: np.ndarray) -> np.ndarray:
    """quant.py's bound on |w - dequantize(p)| per element, with float32 rounding of w / scale and q * scale."""
    if p.format == "fp16":
        return 2.0**-11 * np.abs(w) + 2.0**-25  # half an ulp, or half of float16's subnormal step
    scales = p.scales[:, None] if p.format == "int8" else np.repeat(p.scales.astype(np.float32), p.group_size, axis=1)
    return scales / 2 + 4 * np.finfo(np.float32).eps * np.abs(w)


@pytest.mark.parametrize("source", ["synth", "mixtral", "fused"])
def test_bf16_repack_of_a_bf16_checkpoint_keeps_every_expert_byte(source, request, tmp_path):
    model = request.getfixturevalue(source)
    report = repack(model, tmp_path / "out", "bf16")

    manifest = load_manifest(tmp_path / "out")
    assert len(manifest.experts) == 2 * NUM_EXPERTS
    for (layer, expert), entry in manifest.experts.items():
        gate_up, down = unpack_expert(_expert_range(tmp_path / "out", entry), entry)
        assert (gate_up.data.tobytes(), down.data.tobytes()) == _source_expert(model, layer, expert)
    assert report.max_abs_error == report.worst_rel_fro_error == 0


@pytest.mark.parametrize("format", ["fp16", "int8", "int4"])
@pytest.mark.parametrize("source", ["synth", "fused"])
def test_packed_experts_are_within_their_formats_bound_of_the_source(source, format, request, tmp_path):
    model = request.getfixturevalue(source)
    report = repack(model, tmp_path / "out", format, group_size=16)

    manifest = load_manifest(tmp_path / "out")
    max_abs, rel_fro = 0.0, []
    for (layer, expert), entry in manifest.experts.items():
        packed = unpack_expert(_expert_range(tmp_path / "out", entry), entry)
        for p, raw in zip(packed, _source_expert(model, layer, expert), strict=True):
            assert p.format == format
            w = _widen(raw, p.shape)
            error = np.abs(w - quant.dequantize(p))
            assert (error <= _bound(p, w)).all()
            max_abs = max(max_abs, float(error.max()))
            rel_fro.append(np.linalg.norm(error) / np.linalg.norm(w))
    assert max_abs > 0
    assert report.max_abs_error == pytest.approx(max_abs)
    assert report.mean_rel_fro_error == pytest.approx(np.mean(rel_fro), rel=1e-5)
    assert report.worst_rel_fro_error == pytest.approx(max(rel_fro), rel=1e-5)


@pytest.mark.parametrize("align", [4096, 16384])
def test_ranges_are_aligned_disjoint_and_layer_major(synth, tmp_path, align):
    repack(synth, tmp_path / "out", "int8", align=align)

    manifest = load_manifest(tmp_path / "out")
    keys = list(manifest.experts)
    assert keys == sorted(keys)
    end = 0
    for entry in manifest.experts.values():
        assert entry.offset % align == 0 and entry.offset >= end
        assert entry.gate_up.offset == 0
        assert entry.down.offset % 16 == 0 and entry.down.offset >= entry.gate_up.nbytes
        assert entry.nbytes == entry.down.offset + entry.down.nbytes
        end = entry.offset + entry.nbytes
    size = (tmp_path / "out" / "experts.bin").stat().st_size
    assert size % align == 0 and end <= size == manifest.files["experts.bin"]


@pytest.mark.parametrize("source", ["synth", "mixtral", "fused"])
def test_dense_weights_and_side_files_are_copied_unchanged(source, request, tmp_path):
    model = request.getfixturevalue(source)
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is as good as a new one
    report = repack(model, out, "int4", group_size=16)

    before, after = independent_headers(model), independent_headers(out)
    experts = {name for name in before if ".experts." in name}
    assert set(after) == set(before) - experts
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    for name, info in after.items():
        assert (info["dtype"], info["shape"]) == (before[name]["dtype"], before[name]["shape"])
        assert _tensor_bytes(info) == _tensor_bytes(before[name])
    source_checkpoint, copy = Checkpoint.open(model), Checkpoint.open(out)
    for name in after:
        np.testing.assert_array_equal(copy.read(name), source_checkpoint.read(name))
    side_files = {"config.json", "tokenizer.json", "generation_config.json", "synth.json"}
    copied = {p.name for p in model.iterdir()} & side_files
    assert copied and {p.name for p in out.iterdir()} == copied | {"model.safetensors", "experts.bin", "repack.json"}
    for name in copied:
        assert (out / name).read_bytes() == (model / name).read_bytes()
    assert report.source_expert_bytes == sum(before[name]["nbytes"] for name in experts)
    assert report.resident_bytes == (out / "model.safetensors").stat().st_size
    assert report.expert_file_bytes == (out / "experts.bin").stat().st_size
    assert (report.layers, report.experts) == (2, 2 * NUM_EXPERTS)
    assert "int4, group size 16" in report.summary()


def test_unpacked_matrices_view_the_given_bytes(synth, tmp_path):
    repack(synth, tmp_path / "out", "int8")
    entry = load_manifest(tmp_path / "out").experts[(1, 3)]
    raw = _expert_range(tmp_path / "out", entry)

    gate_up, down = unpack_expert(raw, entry)
    for p in (gate_up, down):
        assert np.shares_memory(p.data, raw) and np.shares_memory(p.scales, raw)
    with pytest.raises(ValueError, match="bytes of layer 1 expert 3"):
        unpack_expert(raw[:-1], entry)


def test_is_repacked_tells_a_repacked_directory_from_a_checkpoint(synth, repacked):
    assert is_repacked(repacked) and not is_repacked(synth)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit of the manifest setting the field at the dotted ``path`` (list indices as numbers)."""

    def edit(manifest: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = manifest
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        target[int(last) if last.isdigit() else last] = value(manifest) if callable(value) else value

    return edit


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = manifest
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        del target[int(last) if last.isdigit() else last]

    return edit


CORRUPTIONS = {
    "missing expert": (_delete("experts.3"), "experts"),
    "duplicate expert": (_set("experts.3", lambda m: m["experts"][2]), "experts[3]"),
    "overlapping ranges": (
        _set("experts.1.offset", lambda m: m["experts"][0]["offset"] + m["align"]),
        "experts[1].offset",
    ),
    "unaligned offset": (_set("experts.2.offset", lambda m: m["experts"][2]["offset"] + 16), "experts[2].offset"),
    "range past the file": (_set("experts.15.offset", lambda m: m["files"]["experts.bin"]), "experts[15].nbytes"),
    "wrong shape": (_set("experts.0.gate_up.shape", [32, 64]), "experts[0].gate_up.shape"),
    "wrong matrix size": (
        _set("experts.0.down.nbytes", lambda m: m["experts"][0]["down"]["nbytes"] - 2),
        "experts[0].down.nbytes",
    ),
    "overlapping matrices": (_set("experts.0.down.offset", 16), "experts[0].down.offset"),
    "unaligned matrix": (
        _set("experts.0.down.offset", lambda m: m["experts"][0]["down"]["offset"] + 8),
        "experts[0].down.offset",
    ),
    "matrix in another format": (_set("experts.0.down.format", "int8"), "experts[0].down.format"),
    "not a MoE layer": (_set("experts.0.layer", 2), "experts[0].layer"),
    "no such expert": (_set("experts.0.expert", NUM_EXPERTS), "experts[0].expert"),
    "missing field": (_delete("experts.0.file"), "experts[0].file"),
    "unknown format": (_set("format", "int3"), "format"),
    "int4 group size": (_set("group_size", 64), "group_size"),
    "schema version": (_set("schema_version", 2), "schema_version"),
    "small align": (_set("align", 512), "align"),
    "another source config": (_set("source.config_sha256", "0" * 64), "source.config_sha256"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_a_corrupted_manifest_is_refused_naming_the_field(repacked, tmp_path, corruption):
    edit, field = CORRUPTIONS[corruption]
    out = shutil.copytree(repacked, tmp_path / "out")
    manifest = json.loads((out / "repack.json").read_text())
    edit(manifest)
    (out / "repack.json").write_text(json.dumps(manifest))

    with pytest.raises(CheckpointError) as error:
        load_manifest(out)
    assert (Path(error.value.path).name, error.value.field) == ("repack.json", field)


def test_a_truncated_expert_file_is_refused(repacked, tmp_path):
    out = shutil.copytree(repacked, tmp_path / "out")
    size = (out / "experts.bin").stat().st_size
    with open(out / "experts.bin", "r+b") as f:
        f.truncate(size - 4096)

    with pytest.raises(CheckpointError, match="truncated") as error:
        load_manifest(out)
    assert Path(error.value.path).name == "experts.bin"


@pytest.mark.parametrize("name", ["experts.bin", "repack.json", "config.json"])
def test_a_missing_file_is_refused_naming_it(repacked, tmp_path, name):
    out = shutil.copytree(repacked, tmp_path / "out")
    (out / name).unlink()

    with pytest.raises(CheckpointError) as error:
        load_manifest(out)
    assert Path(error.value.path).name == name


def test_an_edited_config_is_refused(repacked, tmp_path):
    out = shutil.copytree(repacked, tmp_path / "out")
    (out / "config.json").write_text((out / "config.json").read_text() + "\n")

    with pytest.raises(CheckpointError) as error:
        load_manifest(out)
    assert error.value.field == "source.config_sha256"


def test_an_interrupted_repack_leaves_no_manifest(synth, tmp_path, monkeypatch):
    real_quantize, calls = quant.quantize, []

    def quantize_then_fail(*args: Any, **kwargs: Any) -> quant.PackedMatrix:
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("interrupted")
        return real_quantize(*args, **kwargs)

    monkeypatch.setattr(quant, "quantize", quantize_then_fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        repack(synth, tmp_path / "out", "int8")

    assert (tmp_path / "out" / "experts.bin").exists()
    assert not is_repacked(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("repack.json*")) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "int3"}, "format must be one of"),
        ({"format": "int4", "group_size": 48}, "gate_up .64, 64.: group_size 48 must divide in = 64"),
        ({"format": "int4", "group_size": 64}, "down .64, 32.: group_size 64 must divide in = 32"),
        ({"format": "int4", "group_size": 0}, "gate_up .* group_size must be a positive even integer"),
        ({"format": "bf16", "align": 0}, "align must be a positive multiple of 4096"),
        ({"format": "bf16", "align": 512}, "align must be a positive multiple of 4096"),
        ({"format": "bf16", "align": 6144}, "align must be a positive multiple of 4096"),
        ({"format": "bf16", "align": -4096}, "align must be a positive multiple of 4096"),
    ],
)
def test_bad_arguments_are_refused_before_writing(synth, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        repack(synth, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_directory_is_refused(synth, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")

    with pytest.raises(CheckpointError, match="not empty") as error:
        repack(synth, out, "bf16")
    assert error.value.path == str(out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_missing_or_foreign_model_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        repack(tmp_path / "absent", tmp_path / "out", "bf16")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not a model")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        repack(tmp_path / "notes", tmp_path / "out", "bf16")
    assert not (tmp_path / "out").exists()


def test_a_repacked_directory_is_not_repacked_again(repacked, tmp_path):
    with pytest.raises(CheckpointError, match="already repacked"):
        repack(repacked, tmp_path / "out", "int8")


def test_a_model_without_moe_layers_is_refused(tmp_path):
    _, path = build("qwen3_moe", tmp_path / "dense", mlp_only_layers=[0, 1, 2])

    with pytest.raises(CheckpointError, match="no MoE layer"):
        repack(path, tmp_path / "out", "int8")
    assert not (tmp_path / "out").exists()
