"""Bad input and edge cases of a study (issue 17): constraints no trial meets end the command with the
constraints broken and the closest trial, exit 1, and nothing exported (an earlier run's tuned.toml set
aside); a memory budget that cannot hold the model's dense weights is refused before anything starts, with
the minimum as the file would say it."""

from __future__ import annotations

import re
import subprocess

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from engine.bench.protocol import resident_bytes
from search.export import no_choice, pick
from search.trials import ATTR_BOUNDS
from tests.search.conftest import AUTORESEARCH, tune_command, write_experiment

OBJECTIVES = [("decode_tok_s", "maximize")]
MiB = 1 << 20


def _trial(speed: float, kl: float, top1: float, constraints: dict[str, float]) -> optuna.trial.FrozenTrial:
    summary = {"decode_tok_s": speed, "quality_kl": kl, "quality_top1": top1, "memory_peak_bytes": 300 * MiB}
    return create_trial(
        state=TrialState.COMPLETE,
        values=[speed],
        user_attrs={"config": {"io_threads": int(speed)}, "summary": summary},
        constraints=constraints,
    )


def _study(*trials: optuna.trial.FrozenTrial, **attrs) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for trial in trials:
        study.add_trial(trial)
    for key, value in {"objectives": OBJECTIVES, "memory_budget": 1 << 30, **attrs}.items():
        study.set_user_attr(key, value)
    return study


def test_pick_finds_nothing_when_every_trial_breaks_a_constraint_and_says_which_is_closest() -> None:
    bounds = {"min_quality_top1": 0.95, "max_quality_kl": 0.1}
    study = _study(
        _trial(30, 0.5, 0.70, {"quality_top1": 0.95 - 0.70, "quality_kl": 0.5 - 0.1, "memory": -0.7}),
        _trial(20, 0.2, 0.97, {"quality_top1": 0.95 - 0.97, "quality_kl": 0.2 - 0.1, "memory": -0.7}),  # closest
        _trial(10, 0.3, 0.96, {"quality_top1": 0.95 - 0.96, "quality_kl": 0.3 - 0.1, "memory": -0.7}),
        **{ATTR_BOUNDS: bounds},
    )
    for how in ("fastest", "knee", "min-quality=0.5"):
        assert pick(study, OBJECTIVES, how) is None
    message = no_choice(study, "fastest")
    assert message.startswith("no trial met the constraints, so nothing was exported")
    assert "3 broke max_quality_kl = 0.1 and 1 broke min_quality_top1 = 0.95" in message
    assert "The closest, trial 1 (decode_tok_s 20; io_threads=20), has quality_kl 0.2 > 0.1." in message


def test_quality_is_judged_against_the_latest_constraints() -> None:
    """Constraints stored under an earlier run's bounds: a trial feasible then is not exported once the
    bound is tightened past it, and one that broke a bound since loosened is."""
    loose = _trial(30, 0.02, 0.90, {"quality_top1": 0.80 - 0.90})  # measured under min_quality_top1 = 0.80
    strict = _trial(20, 0.01, 0.93, {"quality_top1": 0.99 - 0.93})  # measured under 0.99
    study = _study(loose, strict, **{ATTR_BOUNDS: {"min_quality_top1": 0.95}})
    assert pick(study, OBJECTIVES, "fastest") is None
    assert "trial 1 (decode_tok_s 20; io_threads=20), has quality_top1 0.93 < 0.95" in no_choice(study, "fastest")
    study.set_user_attr(ATTR_BOUNDS, {"min_quality_top1": 0.92})
    assert pick(study, OBJECTIVES, "fastest").trial.number == 1
    study.set_user_attr(ATTR_BOUNDS, {})
    assert pick(study, OBJECTIVES, "fastest").trial.number == 0


def test_memory_and_failures_are_named_too() -> None:
    over = _trial(30, 0.0, 1.0, {"memory": 0.25})
    over.user_attrs["summary"]["memory_peak_bytes"] = 1280 * MiB
    message = no_choice(_study(over), "fastest")
    assert '1 broke memory_budget = "1 GiB"' in message and "memory peak 1.25 GiB > memory_budget 1 GiB" in message
    failed = [
        create_trial(state=TrialState.FAIL, user_attrs={"failure": f"out_of_memory: killed ({i})"}) for i in (1, 2)
    ]
    message = no_choice(_study(*failed), "fastest")
    assert message.startswith("no trial was measured to the end, so nothing was exported: 2 failed (out_of_memory 2)")
    assert 'memory_budget = "1 GiB" may leave too little' in message
    feasible = _study(_trial(30, 0.01, 0.9, {"quality_top1": 0.8 - 0.9}))
    assert "highest among the 1 feasible trials is 0.9 (trial 0)" in no_choice(feasible, "min-quality=0.95")


LOSSY_SPACE = '[fixed]\ntop_k = 1\n\n[params.io_mode]\nchoices = ["pread", "direct"]\n'  # half the experts: KL ~0.5
RUN = '[measure]\nrepeats = 1\nwarmup = 0\nconfirm = 0\n[search]\nsampler = "random"\nseed = 0\n'


def test_constraints_no_trial_meets_end_with_the_closest_trial_and_nothing_exported(tiny_model, tmp_path) -> None:
    """A first run without constraints exports a config; the same study run again with a KL bound that halving
    the experts per token cannot meet (every config of the space does) measures one more trial, and ends
    with exit 1, the bound and the closest trial named, no tuned.toml (the first run's set aside as stale),
    and a report that says so. `autoresearch export` on the study fails the same way."""
    runs = tmp_path / "runs"
    experiment = write_experiment(tmp_path, tiny_model, "tight", f"[budget]\ntrials = 1\n{RUN}")
    (tmp_path / "small.toml").write_text(LOSSY_SPACE)
    first = subprocess.run(tune_command(experiment, runs), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    results = runs / "tight"
    assert (results / "tuned.toml").exists()

    experiment.write_text(
        experiment.read_text().replace("trials = 1", "trials = 2") + "[constraints]\nmax_quality_kl = 0.0001\n"
    )
    done = subprocess.run(tune_command(experiment, runs), capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    (message,) = [line for line in done.stderr.splitlines() if line.startswith("autoresearch tune:")]
    assert message.startswith("autoresearch tune: no trial met the constraints, so nothing was exported: of the 2 "
                              "trials measured to the end, 2 broke max_quality_kl = 0.0001.")  # fmt: skip
    assert re.search(r"The closest, trial [01] \(decode_tok_s [\d.]+; top_k=1 .*\), has quality_kl [\d.e-]+ > 0\.0001",
                     message), message  # fmt: skip
    assert "The tuned.toml an earlier run exported was renamed tuned.toml.stale" in message
    assert not (results / "tuned.toml").exists() and (results / "tuned.toml.stale").exists()
    assert "tuned config:   none" in done.stdout
    report = (results / "report.md").read_text()
    assert "## Nothing exported" in report and "2 broke max_quality_kl = 0.0001" in report
    assert "renamed tuned.toml.stale" in report

    out = tmp_path / "exported.toml"
    export = subprocess.run([AUTORESEARCH, "export", "--experiment", "tight", "--runs", str(runs), "-o", str(out)],
                            capture_output=True, text=True)  # fmt: skip
    assert export.returncode == 1 and "Traceback" not in export.stderr
    assert export.stderr.startswith("autoresearch export: no trial met the constraints, so nothing was exported")
    assert not out.exists()


@pytest.mark.parametrize("budget", ["half", "equal"])
def test_a_budget_below_the_dense_weights_is_refused_before_anything_starts(tiny_model, tmp_path, budget) -> None:
    resident = resident_bytes(tiny_model)
    experiment = write_experiment(tmp_path, tiny_model, "starved", "[budget]\ntrials = 1\n")
    given = resident // 2 if budget == "half" else resident
    experiment.write_text(experiment.read_text().replace('memory_budget = "1GiB"', f"memory_budget = {given}"))
    runs = tmp_path / "runs"
    done = subprocess.run(tune_command(experiment, runs), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and f"{experiment}: field 'experiment.memory_budget'" in done.stderr
    assert f'the minimum is memory_budget = "{resident // MiB + 1}MiB"' in done.stderr
    assert not runs.exists()  # no study, log, Ray instance or MLflow store was started
