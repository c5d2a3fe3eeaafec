"""Where the tool keeps what it measures and makes once per machine: probes, quality references, repacked copies."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$AUTORESEARCH_CACHE``, else ``$XDG_CACHE_HOME/autoresearch``, else ``~/.cache/autoresearch``."""
    if os.environ.get("AUTORESEARCH_CACHE"):
        return Path(os.environ["AUTORESEARCH_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "autoresearch"
    return Path.home() / ".cache" / "autoresearch"
