"""The safetensors header parser: valid files round-trip, anything else raises CheckpointError only."""

from __future__ import annotations

import contextlib
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from engine.errors import CheckpointError
from engine.formats.safetensors_file import DTYPE_SIZES, SafetensorsWriter, parse_header, read_header


def test_reads_offsets_written_by_the_reference_library(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, dtype=np.float16)}
    save_file(tensors, tmp_path / "x.safetensors")
    header = read_header(tmp_path / "x.safetensors")
    raw = (tmp_path / "x.safetensors").read_bytes()
    for name, value in tensors.items():
        info = header[name]
        assert info.shape == value.shape
        assert raw[info.start : info.end] == value.tobytes()


def test_writer_output_is_read_by_the_reference_library(tmp_path):
    from safetensors.numpy import load_file

    a, b = np.arange(6, dtype=np.float32).reshape(3, 2), np.arange(5, dtype=np.int64)
    writer = SafetensorsWriter(tmp_path / "w.safetensors", [("a", "F32", (3, 2)), ("b", "I64", (5,))])
    writer.write("a", a.tobytes())
    writer.write("b", b.tobytes())
    writer.close()
    loaded = load_file(tmp_path / "w.safetensors")
    np.testing.assert_array_equal(loaded["a"], a)
    np.testing.assert_array_equal(loaded["b"], b)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from([*DTYPE_SIZES, "F4", ""]) | json_values,
        "shape": st.lists(st.integers(-2, 8), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-4, 300), max_size=3) | json_values,
    },
)
headers = st.dictionaries(st.text(max_size=6), entries | json_values, max_size=5) | json_values


@settings(max_examples=400, deadline=None)
@given(raw=st.binary(max_size=200), extra=st.integers(-50, 400))
def test_arbitrary_bytes_raise_only_checkpoint_error(raw, extra):
    with contextlib.suppress(CheckpointError):
        parse_header(raw, 8 + len(raw) + extra, "fuzz.safetensors")


@settings(max_examples=400, deadline=None)
@given(header=headers, data_size=st.integers(0, 300))
def test_arbitrary_json_headers_raise_only_checkpoint_error(header, data_size):
    raw = json.dumps(header).encode()
    with contextlib.suppress(CheckpointError):
        parse_header(raw, 8 + len(raw) + data_size, "fuzz.safetensors")


@settings(max_examples=200, deadline=None)
@given(content=st.binary(max_size=64) | headers.map(lambda h: _file_with_header(json.dumps(h).encode())))
def test_arbitrary_files_raise_only_checkpoint_error(content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.safetensors"
        path.write_bytes(content)
        try:
            read_header(path)
        except CheckpointError as e:
            assert "fuzz.safetensors" in str(e)


def _file_with_header(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw + bytes(64)
