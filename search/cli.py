"""``autoresearch``: the one command-line program, the engine's verbs (``engine.cli``) and the search's. A verb's
arguments are added only when it runs, and handlers import what they need, so --help is instant."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from engine.cli import VERBS as ENGINE_VERBS
from engine.cli import Verb, mount


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="autoresearch", description=__doc__)
    mount(parser.add_subparsers(dest="verb", required=True), {**ENGINE_VERBS, **SEARCH_VERBS}, argv)
    args = parser.parse_args(argv)
    from engine.errors import EngineError
    from search.errors import SearchError

    try:
        return args.run(args)
    except (EngineError, ValueError, SearchError) as e:
        print(f"autoresearch {args.verb}: error: {e}", file=sys.stderr)
        return 2


def _tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="an experiment file (experiments/*.toml)")
    parser.add_argument("--runs", default="runs", help="where studies, logs, tuned configs and the MLflow store go")
    parser.add_argument("--tracking-uri", help="an MLflow tracking URI (default: sqlite:///RUNS/mlflow.db)")
    parser.add_argument("--ray-address", help="an existing Ray cluster (default: the experiment's, else a local one)")
    parser.add_argument("--no-probe", action="store_true", help="skip the disk probe (results without a roofline)")


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", required=True, help="the experiment file or its name")
    parser.add_argument("--pick", default="fastest", help="fastest | knee | min-quality=<top-1>, e.g. min-quality=0.99")
    parser.add_argument("-o", "--out", required=True, help="the TOML file to write")
    parser.add_argument("--runs", default="runs")


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", required=True, help="the experiment file or its name")
    parser.add_argument("--out", help="the page to write (default: RUNS/<experiment>/report.md)")
    parser.add_argument("--runs", default="runs")


def _ui_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--tracking-uri", help="an MLflow tracking URI (default: sqlite:///RUNS/mlflow.db)")
    parser.add_argument("--port", type=int, default=5000)


def _tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from search.experiment import load_experiment
    from search.tune import TuneOptions, tune

    experiment = load_experiment(args.experiment)  # every table and key checked before anything runs
    options = TuneOptions(Path(args.runs), args.tracking_uri, args.ray_address, probe=not args.no_probe)
    outcome = tune(experiment, options)
    report = outcome.report.read_text() if outcome.report else ""
    start = min((report.find(h) for h in ("## Confirmation", "## Best trials") if h in report), default=len(report))
    print("\n" + report[start : report.find("## Plots") if "## Plots" in report else None].strip() + "\n")
    print(f"study and log:  {outcome.results}/ (study.journal, tune.log)")
    print(f"report:         {outcome.report} (and report.html, its plots inside)")
    print(f"tuned config:   {outcome.tuned or 'none (nothing exported; why below)'}")
    store = f"--tracking-uri {args.tracking_uri}" if args.tracking_uri else f"--runs {args.runs}"
    print(f"MLflow UI:      {sys.argv[0]} ui {store}   (it prints the runs table's address)")
    print(f"Optuna:         optuna-dashboard {outcome.results / 'study.journal'}   (pip install optuna-dashboard)")
    if outcome.interrupted:
        print("interrupted: run the same command again to continue the study", file=sys.stderr)
        return 130
    if outcome.tuned is None:  # no trial meets every constraint (or none was measured to the end)
        print(f"autoresearch tune: {outcome.unmet}", file=sys.stderr)
        return 1
    return 0


def _open_study(experiment: str, runs: str):
    from pathlib import Path

    import optuna

    from search.errors import SearchError
    from search.study import JOURNAL, journal
    from search.tune import results_dir

    name = Path(experiment).stem
    results = results_dir(Path(runs), name)
    if not (results / JOURNAL).exists():
        raise SearchError(
            f"no study for experiment {name!r}: {results / JOURNAL} does not exist (run `autoresearch tune` first)"
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=journal(results))


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from search.export import export, no_choice, parse_pick, pick

    parse_pick(args.pick)
    study = _open_study(args.experiment, args.runs)
    choice = pick(study, study.user_attrs["objectives"], args.pick)
    if choice is None:  # nothing written: no trial meets every constraint (and the pick's bound)
        print(f"autoresearch export: {no_choice(study, args.pick)}", file=sys.stderr)
        return 1
    out = export(study, choice, Path(args.out))
    print(f"wrote {out}: trial {choice.trial.number} ({args.pick})")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from search.report import write_html, write_report
    from search.tune import results_dir

    study = _open_study(args.experiment, args.runs)
    out = Path(args.out) if args.out else results_dir(Path(args.runs), study.study_name) / "report.md"
    report = write_report(study, study.user_attrs["objectives"], out)
    print(f"wrote {report} and {write_html(report)}")
    return 0


def _ui(args: argparse.Namespace) -> int:
    from pathlib import Path

    from search.ui import default_tracking_uri, serve

    return serve(args.tracking_uri or default_tracking_uri(Path(args.runs)), args.port)


SEARCH_VERBS = {
    "tune": Verb(
        "search engine configs for an experiment (Optuna, Ray, MLflow); resumable",
        _tune_arguments,
        _tune,
    ),
    "export": Verb(
        "write a tuned config (with its provenance) from an experiment's study",
        _export_arguments,
        _export,
    ),
    "report": Verb(
        "write an experiment's study as a markdown page with plots",
        _report_arguments,
        _report,
    ),
    "ui": Verb(
        "the MLflow UI over the tuning runs, on 127.0.0.1",
        _ui_arguments,
        _ui,
    ),
}


if __name__ == "__main__":
    sys.exit(main())
