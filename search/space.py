"""Search spaces: TOML files (``spaces/*.toml``) naming ``EngineConfig`` fields, sampled through Optuna trials.

A space has a ``[params.<field>]`` table per searched knob and an optional ``[fixed]`` table of settings every
trial shares::

    [fixed]
    cache_format = "packed"

    [params.predictor]
    choices = ["none", "gate_lookahead"]

    [params.prefetch_depth]          # only sampled when the condition holds
    low = 1
    high = 3
    when = { predictor = ["gate_lookahead"] }

    [params.cache_bytes]             # a fraction of the experiment's memory budget, in bytes
    low = 0.05
    high = 0.6
    fraction_of = "memory_budget"

A parameter is categorical (``choices``), or a range (``low``, ``high``, optionally ``log = true`` and
``step``): integer when both ends are integers, else float. ``when`` lists, per earlier parameter, the values
it must have taken. Everything is checked when the file is loaded (unknown keys and fields, empty ranges,
conditions on parameters that are not defined before, values a field refuses), so a bad space fails before
any trial runs, with the file and the key in the message.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from engine.config import EngineConfig, read_toml
from engine.errors import FileError
from engine.units import parse_bytes

FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}
PARAM_KEYS = {"choices", "low", "high", "log", "step", "when", "fraction_of"}
# What a fraction may be of: the experiment's memory budget (bytes), the model's active experts, the machine's cores.
FRACTION_SOURCES = ("memory_budget", "model_top_k", "cpu_cores")
NOMINAL = {"memory_budget": 1 << 30, "model_top_k": 8, "cpu_cores": 8}  # for checking a space's values at load
SPACES_DIR = Path(__file__).resolve().parent.parent / "spaces"


class SpaceError(FileError):
    """A search space file that cannot be used."""


@dataclass(frozen=True)
class Param:
    name: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    fraction_of: str | None = None

    @property
    def is_int(self) -> bool:
        """Integer ends make an integer range, except for a fraction, which is always a float."""
        return (
            self.choices is None
            and self.fraction_of is None
            and isinstance(self.low, int)
            and isinstance(self.high, int)
        )

    def resolve(self, value: Any, context: dict[str, int]) -> Any:
        """The setting for a sampled value: itself, or that fraction of the context's quantity (at least 1)."""
        if self.fraction_of is None:
            return value
        if self.fraction_of not in context:
            raise ValueError(f"{self.name} is a fraction of {self.fraction_of}, which the experiment does not give")
        return max(1, round(value * context[self.fraction_of]))

    def active(self, chosen: dict[str, Any]) -> bool:
        return all(chosen.get(name) in allowed for name, allowed in self.when)

    def distribution(self) -> BaseDistribution:
        if self.choices is not None:
            return CategoricalDistribution(list(self.choices))
        if self.is_int:
            return IntDistribution(int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return FloatDistribution(float(self.low), float(self.high), step=self.step, log=self.log)

    def suggest(self, trial: optuna.Trial) -> Any:
        d = self.distribution()
        if isinstance(d, CategoricalDistribution):
            return trial.suggest_categorical(self.name, list(d.choices))
        if isinstance(d, IntDistribution):
            return trial.suggest_int(self.name, d.low, d.high, step=d.step, log=d.log)
        return trial.suggest_float(self.name, d.low, d.high, step=d.step, log=d.log)


@dataclass(frozen=True)
class Space:
    path: Path
    params: tuple[Param, ...]
    fixed: dict[str, Any]

    def sample(self, trial: optuna.Trial, context: dict[str, int]) -> EngineConfig:
        """The configuration ``trial`` proposes: fixed settings, then each parameter whose condition holds;
        fractions are of ``context``'s quantities (``FRACTION_SOURCES``)."""
        chosen: dict[str, Any] = {}
        values = dict(self.fixed)
        for param in self.params:
            if param.active(chosen):
                chosen[param.name] = param.suggest(trial)
                values[param.name] = param.resolve(chosen[param.name], context)
        return EngineConfig.from_dict(values, self.path)

    def grid(self) -> dict[str, list[Any]]:
        """Every value of every parameter, for the grid sampler (float ranges need a step: see load_experiment)."""
        grid: dict[str, list[Any]] = {}
        for p in self.params:
            if p.choices is not None:
                grid[p.name] = list(p.choices)
            elif p.is_int:
                grid[p.name] = list(range(int(p.low), int(p.high) + 1, int(p.step or 1)))
            else:
                count = round((p.high - p.low) / p.step) + 1
                grid[p.name] = [min(p.high, p.low + i * p.step) for i in range(count)]
        return grid


def load_space(path: str | Path) -> Space:
    """A space file, checked; a bare name (``default``) is looked up in the project's ``spaces/``."""
    path = Path(path)
    if path.suffix != ".toml" and not path.exists():
        path = SPACES_DIR / f"{path}.toml"
    document = read_toml(path, SpaceError, "no such search space file")
    unknown = set(document) - {"params", "fixed"}
    if unknown:
        raise SpaceError(path, "unknown table; a space has [params.<field>] and [fixed]", field=sorted(unknown)[0])
    fixed = document.get("fixed", {})
    tables = document.get("params", {})
    for name, value in (("fixed", fixed), ("params", tables)):
        if not isinstance(value, dict):
            raise SpaceError(path, "expected a table", field=name)
    for name in fixed:
        _check_field(path, f"fixed.{name}", name)
    if not tables:
        raise SpaceError(path, "no parameters: add [params.<field>] tables", field="params")
    params: list[Param] = []
    for name, table in tables.items():
        key = f"params.{name}"
        _check_field(path, key, name)
        if name in fixed:
            raise SpaceError(path, "is both fixed and searched", field=key)
        params.append(_param(path, key, name, table, {p.name: p for p in params}))
    space = Space(path, tuple(params), dict(fixed))
    _check_group_size(space)
    _check_values(space)
    return space


def _check_group_size(space: Space) -> None:
    """``group_size`` goes with int4 weights only: searched, it must be conditioned on them where they vary."""
    group = next((p for p in space.params if p.name == "group_size"), None)
    weights = next((p for p in space.params if p.name == "weights"), None)
    if group is None:
        return
    possible = weights.choices if weights is not None else (space.fixed.get("weights", "original"),)
    allowed = dict(group.when).get("weights", possible)
    if any(value != "int4" for value in allowed):
        raise SpaceError(
            space.path, 'applies to int4 weights only: add when = { weights = ["int4"] }', field="params.group_size"
        )


def _check_field(path: Path, key: str, name: str) -> None:
    if name not in FIELDS:
        raise SpaceError(path, f"not an engine setting; known: {', '.join(sorted(FIELDS))}", field=key)


def _param(path: Path, key: str, name: str, table: object, earlier: dict[str, Param]) -> Param:
    if not isinstance(table, dict):
        raise SpaceError(path, "expected a table", field=key)
    unknown = set(table) - PARAM_KEYS
    if unknown:
        raise SpaceError(
            path, f"unknown key; a parameter takes {', '.join(sorted(PARAM_KEYS))}", field=f"{key}.{sorted(unknown)[0]}"
        )
    when = tuple(_conditions(path, key, table.get("when", {}), earlier))
    fraction_of = table.get("fraction_of")
    if fraction_of is not None and fraction_of not in FRACTION_SOURCES:
        raise SpaceError(path, f"must be one of {', '.join(FRACTION_SOURCES)}", field=f"{key}.fraction_of")
    if "choices" in table:
        choices = table["choices"]
        if set(table) & {"low", "high", "log", "step"}:
            raise SpaceError(path, "has both choices and a range", field=key)
        if not isinstance(choices, list) or not choices:
            raise SpaceError(path, "must be a non-empty list", field=f"{key}.choices")
        if len(set(map(repr, choices))) != len(choices):
            raise SpaceError(path, "lists a value twice", field=f"{key}.choices")
        return Param(name, choices=tuple(choices), when=when, fraction_of=fraction_of)
    if "low" not in table or "high" not in table:
        raise SpaceError(path, "needs choices, or low and high", field=key)
    low, high = _number(path, f"{key}.low", table["low"]), _number(path, f"{key}.high", table["high"])
    if not low < high:
        raise SpaceError(path, f"empty range: low {low!r} is not below high {high!r}", field=key)
    log = table.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(path, "must be true or false", field=f"{key}.log")
    if log and low <= 0:
        raise SpaceError(path, "a log range must start above 0", field=f"{key}.low")
    step = table.get("step")
    param = Param(name, low=low, high=high, log=log, when=when, fraction_of=fraction_of)
    if step is not None:
        step = _number(path, f"{key}.step", step)
        if step <= 0 or log or (param.is_int and not isinstance(step, int)):
            raise SpaceError(
                path, "must be positive (an integer for an integer range), and cannot go with log", field=f"{key}.step"
            )
    return dataclasses.replace(param, step=step)


def _number(path: Path, key: str, value: object) -> int | float:
    if isinstance(value, str):  # "256KiB" and such, for byte-sized settings
        try:
            return parse_bytes(value, key)
        except ValueError as e:
            raise SpaceError(path, str(e), field=key) from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpaceError(path, f"must be a number, got {value!r}", field=key)
    return value


def _conditions(path: Path, key: str, when: object, earlier: dict[str, Param]):
    if not isinstance(when, dict):
        raise SpaceError(path, 'expected a table such as { predictor = ["gate_lookahead"] }', field=f"{key}.when")
    for name, allowed in when.items():
        where = f"{key}.when.{name}"
        parent = earlier.get(name)
        if parent is None:
            raise SpaceError(path, "conditions may only name a parameter defined above", field=where)
        if parent.choices is None:
            raise SpaceError(path, "conditions may only name a parameter with choices", field=where)
        values = allowed if isinstance(allowed, list) else [allowed]
        missing = [v for v in values if v not in parent.choices]
        if not values or missing:
            raise SpaceError(
                path, f"{missing or values!r} not among {name}'s choices {list(parent.choices)}", field=where
            )
        yield name, tuple(values)


def _check_values(space: Space) -> None:
    """Each value a parameter can take must be one its field accepts (ends of ranges; fractions of 1 GiB)."""
    try:
        EngineConfig.from_dict(space.fixed, space.path)
    except FileError as e:
        raise SpaceError(space.path, e.message, field=f"fixed.{e.field}") from None
    by_name = {p.name: p for p in space.params}
    for param in space.params:
        values = param.choices if param.choices is not None else (param.low, param.high)
        conditions = [[(name, by_name[name].resolve(v, NOMINAL)) for v in allowed] for name, allowed in param.when]
        for value, condition in itertools.product(values, itertools.product(*conditions)):
            value = param.resolve(value, NOMINAL)
            settings = {**space.fixed, **dict(condition), param.name: value}  # as sampled: its conditions hold
            try:
                EngineConfig.from_dict(settings, space.path)
            except FileError as e:
                raise SpaceError(space.path, f"value {value!r} is refused: {e}", field=f"params.{param.name}") from None
