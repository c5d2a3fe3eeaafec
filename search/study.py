"""The Optuna study of an experiment: on-disk storage next to its results, resumable, warm-started.

The study lives in ``runs/<experiment>/study.journal`` (Optuna's append-only journal file: a killed driver
loses at most the line it was writing). Running the same experiment again continues it: trials the last
driver left running are marked failed, with the reason, and their parameters queued again. The engine's
default config and any exported configs are enqueued first, to be measured like any other trial.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import check_distribution_compatibility
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from engine.bench.fingerprint import engine_version, machine_fingerprint, model_identity
from engine.config import EngineConfig
from engine.units import format_bytes
from search.experiment import Experiment, ExperimentError
from search.space import Space
from search.trials import ATTR_BOUNDS, explicit

log = logging.getLogger("autoresearch.study")

JOURNAL = "study.journal"
STOPPED = "driver stopped"  # the failure reason of trials a killed or interrupted driver left unfinished
ATTR_FAILURE = "failure"  # user attrs: why a trial failed ("timeout: ...", "crashed: ...")
ATTR_SOURCE = "source"  # "default" or an exported config's path (warm starts); None: the sampler's
ATTR_RERUN = "rerun_of"  # the number of the stopped trial whose config this one measures again


def journal(results: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(results / JOURNAL)))


def open_study(experiment: Experiment, results: Path) -> optuna.Study:
    """The experiment's study, created or loaded from ``results/study.journal``."""
    results.mkdir(parents=True, exist_ok=True)
    storage = journal(results)
    with warnings.catch_warnings():  # the Wilcoxon pruner (and multivariate TPE) are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(
            storage=storage,
            study_name=experiment.name,
            directions=[direction for _, direction in experiment.objectives],
            sampler=optuna.samplers.RandomSampler(),  # replaced below, once the history is known
            pruner=make_pruner(experiment),
            load_if_exists=True,
        )
        study.set_metric_names([metric for metric, _ in experiment.objectives])  # the plots' axes, the dashboard's
        # A resumed study must not replay the proposals its first run's seed already made.
        study.sampler = make_sampler(experiment, seed_offset=len(study.get_trials(deepcopy=False)))
    return study


def make_sampler(experiment: Experiment, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    seed = experiment.seed + seed_offset
    match experiment.sampler:
        case "tpe":  # multivariate, without `group` (docs/benchmarks/search.md: fewer trials, fewer misses)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True)
        case "gp":
            return optuna.samplers.GPSampler(seed=seed)
        case "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
        case "random":
            return optuna.samplers.RandomSampler(seed=seed)
        case "grid":
            return optuna.samplers.GridSampler(experiment.space.grid(), seed=seed)
        case "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
    raise AssertionError(experiment.sampler)  # load_experiment checked the name


def make_pruner(experiment: Experiment) -> optuna.pruners.BasePruner:
    """Optuna's Wilcoxon pruner compares a trial's repeats with the best trial's, pairwise by repeat."""
    if experiment.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.WilcoxonPruner(p_threshold=experiment.prune_p, n_startup_steps=2)


def recover_stopped(study: optuna.Study) -> list[int]:
    """Mark the trials a stopped driver left running as failed and queue their parameters again."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        requeue(study, trial.number, trial.params, trial.user_attrs.get(ATTR_SOURCE), "the trial had not finished")
    return [t.number for t in stale]


def requeue(study: optuna.Study, number: int, params: dict[str, Any], source: str | None, why: str) -> None:
    """Fail a trial that was stopped before it finished, and queue its parameters to be measured again."""
    set_user_attr(study, number, ATTR_FAILURE, f"{STOPPED}: {why}")
    study.tell(number, state=TrialState.FAIL)
    attrs = {ATTR_RERUN: number} | ({ATTR_SOURCE: source} if source else {})
    study.enqueue_trial(params, user_attrs=attrs)


def set_user_attr(study: optuna.Study, number: int, key: str, value: Any) -> None:
    """A user attribute on a trial by its number (the driver holds numbers, not ``Trial`` objects)."""
    storage = study._storage
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    storage.set_trial_user_attr(trial_id, key, value)


def enqueue_warm_start(study: optuna.Study, experiment: Experiment, context: dict[str, int]) -> list[str]:
    """Queue the engine's default config, its best recipes (``experiment.recipes``) and the experiment's exported
    configs, each once per study.

    A config the space cannot express (a value outside a parameter's choices, or against its fixed table) is
    skipped with a warning that says why; one outside a numeric range is measured as it is.
    """
    queued = {t.user_attrs.get(ATTR_SOURCE) for t in study.get_trials(deepcopy=False)}
    sources = [("default", EngineConfig())]
    if experiment.recipes:
        sources += list(engine_recipes(experiment.memory_budget).items())
    sources += [(str(path), EngineConfig.load(path)) for path in experiment.warm_start]
    enqueued = []
    for source, config in sources:
        if source in queued:
            continue
        try:
            params = project(experiment.space, config, context)
        except ValueError as e:
            message = f"warm start {source}: not in the space {experiment.space.path}: {e}; skipped"
            log.warning(message)
            warnings.warn(message, stacklevel=2)
            continue
        study.enqueue_trial(params, user_attrs={ATTR_SOURCE: source})
        enqueued.append(source)
    return enqueued


def engine_recipes(budget: int) -> dict[str, EngineConfig]:
    """The engine's best configurations on the 8 GiB synthetic checkpoint (docs/benchmarks/engine.md: 4.9 tok/s
    lossless against 0.6 under mmap; 11.5 with int8 weights at a KL of 6e-5), their caches half the budget. The
    int8 one changes the output: the quality constraints decide, and the sampler learns from the answer."""
    lossless = EngineConfig(io_mode="direct", io_block_bytes=1 << 20, io_threads=4, cache_format="packed",
                            cache_policy="lru", cache_bytes=budget // 2, predictor="gate_lookahead")  # fmt: skip
    return {
        "recipe: direct + lru + gate_lookahead": lossless,
        "recipe: direct + lru + gate_lookahead, int8 weights": dataclasses.replace(lossless, weights="int8"),
    }


def project(space: Space, config: EngineConfig, context: dict[str, int]) -> dict[str, Any]:
    """The space's parameters that give ``config``; ValueError naming the field if no choice of them does."""
    settings = explicit(config, context)
    params: dict[str, Any] = {}
    for param in space.params:
        if not param.active(params):
            continue
        wanted = settings[param.name]
        if param.choices is not None:
            matches = [c for c in param.choices if _resolved(space, param.name, param.resolve(c, context)) == wanted]
            if not matches:
                raise ValueError(f"{param.name} = {wanted!r} is not among {list(param.choices)}")
            params[param.name] = matches[0]
        elif param.fraction_of is not None:
            params[param.name] = wanted / context[param.fraction_of]
        else:
            params[param.name] = wanted
        if not param.choices and not param.low <= params[param.name] <= param.high:
            log.warning("%s = %r lies outside the space's range [%s, %s]", param.name, wanted, param.low, param.high)
    sampled = explicit(space.sample(optuna.trial.FixedTrial(params), context), context)
    differ = [name for name in settings if sampled[name] != settings[name]]
    if differ:
        name = differ[0]
        raise ValueError(f"{name} = {settings[name]!r}, but the space can only give {sampled[name]!r}")
    return params


def _resolved(space: Space, name: str, value: Any) -> Any:
    """A choice as the config holds it (``"1MiB"`` becomes 1048576)."""
    return getattr(EngineConfig.from_dict({name: value} | _companions(name), space.path), name)


def _companions(name: str) -> dict[str, Any]:
    return {"weights": "int4"} if name == "group_size" else {}


def record_identity(study: optuna.Study, experiment: Experiment, model: Path, context: dict, results: Path) -> None:
    """A new study records what its trials were measured on; a resumed one must match it, or its trials
    would not be comparable with the new ones (ExperimentError naming the key that changed)."""
    attrs = study.user_attrs
    identity_of_model = model_identity(model)
    machine = machine_fingerprint(model)
    identity = {
        "objective": [list(o) for o in experiment.objectives],
        "experiment.memory_budget": experiment.memory_budget,
        "experiment.workload": experiment.workload.name,
        "experiment.model": {k: identity_of_model.get(k) for k in ("config_sha256", "weight_files")},
        "machine": {k: machine.get(k) for k in ("cpu", "cores", "ram_bytes", "disk")},
    }
    if "identity" in attrs:
        for key, value in identity.items():
            if attrs["identity"].get(key) != value:
                raise ExperimentError(
                    experiment.path,
                    f"differs from the study in {results} ({attrs['identity'].get(key)!r} there, {value!r}"
                    " now): its trials would not compare; give the experiment a new name, or move that folder",
                    field=key,
                )
        return
    study.set_user_attr("identity", identity)
    study.set_user_attr("machine", machine)
    study.set_user_attr("model", identity_of_model)
    study.set_user_attr("engine", engine_version())
    study.set_user_attr("experiment_file", str(experiment.path.resolve()))
    study.set_user_attr("workload", experiment.workload.name)
    study.set_user_attr("memory_budget", experiment.memory_budget)
    study.set_user_attr("objectives", [list(o) for o in experiment.objectives])
    study.set_user_attr("context", context)


def check_space(study: optuna.Study, experiment: Experiment, results: Path) -> None:
    """A resumed study's parameters must come from distributions Optuna accepts beside those its trials were
    sampled from (the same kind; for a list of choices, the same list): ExperimentError naming the first that
    does not, rather than a failure of every new trial."""
    wanted = {param.name: param.distribution() for param in experiment.space.params}
    for trial in study.get_trials(deepcopy=False):
        for name, had in trial.distributions.items():
            if name in wanted:
                try:
                    check_distribution_compatibility(had, wanted[name])
                except ValueError:
                    raise ExperimentError(
                        experiment.space.path,
                        f"gives {wanted[name]}, but the study in {results} sampled it from {had}, and Optuna "
                        "cannot resume a study with that change: give the experiment a new name, or move that folder",
                        field=f"params.{name}",
                    ) from None


def record_bounds(study: optuna.Study, experiment: Experiment) -> None:
    """The experiment's [constraints], kept in the study: every trial's quality is judged against the latest
    run's (trials.judged), so a tightened bound is never met by a trial measured under a looser one."""
    before = study.user_attrs.get(ATTR_BOUNDS)
    bounds = dict(experiment.constraints)
    if before is not None and before != bounds:
        log.info("constraints changed from %s to %s: every trial is judged against the new ones", before, bounds)
    study.set_user_attr(ATTR_BOUNDS, bounds)


def study_params(experiment: Experiment) -> dict[str, Any]:
    """The parent run's parameters: what ``record_identity`` holds fixed for the study's life."""
    return {
        "objective": ", ".join(f"{direction} {metric}" for metric, direction in experiment.objectives),
        "memory_budget": experiment.memory_budget,
        "memory_budget_readable": format_bytes(experiment.memory_budget),
        "workload": experiment.workload.name,
        "model": str(experiment.model),
    }


def study_tags(study: optuna.Study, experiment: Experiment, results: Path) -> dict[str, Any]:
    attrs = study.user_attrs
    machine, model = attrs["machine"], attrs["model"]
    tags = {f"machine.{k}": v for k, v in machine.items() if not isinstance(v, dict)}
    tags |= {f"model.{k}": v for k, v in model.items() if not isinstance(v, dict | list)}
    tags |= {f"engine.{k}": v for k, v in attrs["engine"].items()}
    tags |= {
        "experiment_file": attrs["experiment_file"],
        "workload": attrs["workload"],
        "memory_budget": format_bytes(attrs["memory_budget"]),
        "study_storage": str((results / "study.journal").resolve()),
        "sampler": experiment.sampler,
    }
    return tags
