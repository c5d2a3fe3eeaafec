"""The engine's error hierarchy: every failure names the file, and the tensor or field, at fault."""

from __future__ import annotations

from pathlib import Path


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class FileError(EngineError):
    """A file the user gave is at fault; the message names it, and the tensor or field."""

    def __init__(self, path: str | Path, message: str, *, tensor: str | None = None, field: str | None = None):
        self.path = str(path)
        self.tensor = tensor
        self.field = field
        self.message = message
        where = self.path
        if tensor is not None:
            where += f": tensor '{tensor}'"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


class CheckpointError(FileError):
    """A checkpoint file is missing, malformed, or disagrees with its config."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint is well formed but asks for an architecture or a setting the engine does not implement."""


class ConfigError(FileError):
    """An engine config (TOML) has an unknown key, a value of the wrong type, or one out of range."""
