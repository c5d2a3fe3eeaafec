"""EngineConfig: every knob of the engine, frozen and validated, round-tripping through a TOML ``[engine]`` table.

Field names are the contract with ``spaces/`` and ``search/``: a search space parameter names a field here.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

TABLE = "engine"


@dataclass(frozen=True)
class EngineConfig:
    # Active experts per token; None keeps the model's own. Fewer is faster and changes the output.
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.top_k is not None and (type(self.top_k) is not int or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or absent but got {self.top_k!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str | Path = "<config>") -> EngineConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(source, f"unknown engine setting; known: {', '.join(sorted(known))}", field=key)
        try:
            return cls(**values)
        except ValueError as e:
            field = str(e).split(" ", 1)[0]  # __post_init__'s messages start with the field's name
            raise ConfigError(source, str(e), field=field) from None

    @classmethod
    def load(cls, path: str | Path) -> EngineConfig:
        """Read the ``[engine]`` table of a TOML file (other tables are left to their owners)."""
        path = Path(path)
        try:
            document = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(path, "no such file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(path, f"not valid TOML: {e}") from None
        table = document.get(TABLE)
        if not isinstance(table, dict):
            raise ConfigError(path, f"expected an [{TABLE}] table", field=TABLE)
        return cls.from_dict(table, path)

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (TOML has no null: an absent key means the default None)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def to_toml(self) -> str:
        lines = [f"[{TABLE}]"]
        for key, value in self.to_dict().items():
            lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {value!r} as a TOML value")
