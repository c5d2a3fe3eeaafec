"""Safetensors headers read independently of the engine's parser, for tests that check the engine's reads."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


def independent_headers(path: Path) -> dict[str, dict[str, Any]]:
    """name -> {file, start (absolute), nbytes, dtype, shape, data_offsets} over every shard in ``path``."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        raw = file.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        for name, entry in json.loads(raw[8 : 8 + n]).items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                out[name] = {"file": file, "start": 8 + n + begin, "nbytes": end - begin, **entry}
    return out
