"""The search benchmark's deterministic pieces: its statistics, and studies that reproduce given a seed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from engine.analysis.trace import record_trace
from engine.bench.workloads import get_workload
from engine.config import EngineConfig
from search import bench_runs
from search import bench_stats as stats
from search.bench_fixtures import READER_BLOCKS, READER_THREADS, TOLERANCES, Fixtures, quality_key
from search.bench_objective import Objective
from search.experiment import load_experiment
from tests.search.conftest import write_experiment


def test_trials_to_reach_counts_from_one_and_none_when_never():
    progress = stats.running_best([None, 1.0, None, 3.0, 2.0])
    assert progress == [-math.inf, 1.0, 1.0, 3.0, 3.0]
    assert stats.trials_to_reach(progress, 1.0) == 2
    assert stats.trials_to_reach(progress, 2.5) == 4
    assert stats.trials_to_reach(progress, 3.5) is None


def test_quantile_interpolates_and_never_is_infinite():
    assert stats.quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert stats.quantile([1.0, 2.0, 3.0], 0.25) == 1.5
    assert stats.quantile([1.0, stats.NEVER, stats.NEVER], 0.5) == stats.NEVER
    assert stats.quantile([1.0, 2.0, stats.NEVER], 0.5) == 2.0
    with pytest.raises(ValueError, match="between 0 and 1"):
        stats.quantile([1.0], 1.5)


def test_geometric_quantiles_of_random_sampling():
    assert stats.geometric_quantile(0.5, 0.5) == 1.0  # half the trials succeed: the first does, half the time
    assert stats.geometric_quantile(0.1, 0.5) == 7.0  # 1 - 0.9^7 = 0.52
    assert stats.geometric_quantile(0.1, 0.75) == 14.0  # 1 - 0.9^14 = 0.77; 0.9^13 leaves 0.75 short
    assert stats.geometric_quantile(0.0, 0.5) == stats.NEVER


def test_hypervolume_of_a_staircase():
    # speed up, KL down, within (0 tok/s, 0.05 nats): (10, 0.03) adds 10 x 0.02, (5, 0.01) adds 5 x 0.02 more
    assert stats.hypervolume_2d([(10.0, 0.03), (5.0, 0.01)], (0.0, 0.05)) == pytest.approx(0.3)
    assert stats.hypervolume_2d([(10.0, 0.03), (4.0, 0.04)], (0.0, 0.05)) == pytest.approx(0.2)  # dominated
    assert stats.hypervolume_2d([(10.0, 0.06)], (0.0, 0.05)) == 0.0  # beyond the reference


@pytest.fixture(scope="module")
def fixtures(tiny_model: Path, tmp_path_factory) -> Fixtures:
    trace = record_trace(tiny_model, get_workload("decode-short"), EngineConfig(io_mode="direct"))
    path = trace.save(tmp_path_factory.mktemp("bench") / "original.npz")
    grid = [[1e9 * (b + 1) + 1e8 * t for t in range(len(READER_THREADS))] for b in range(len(READER_BLOCKS))]
    quality = {quality_key("original", k, t): {"top1": 1.0 - t, "kl": t / 10} for k in (1, 2) for t in TOLERANCES}
    reader = {"original": {"direct": grid, "pread": grid}}
    return Fixtures(tiny_model, trace.top_k, {"original": path}, reader, 5e8, quality, {"path": "tiny"})


def test_objective_interpolates_bandwidth_and_quality(fixtures: Fixtures):
    objective = Objective(fixtures)
    assert objective.bandwidth(EngineConfig(io_mode="direct", io_block_bytes=READER_BLOCKS[1], io_threads=1)) == 2e9
    assert objective.bandwidth(EngineConfig(io_mode="mmap")) == 5e8
    halfway = EngineConfig(cache_policy="lru", cache_bytes=1 << 20, cache_routing_tolerance=TOLERANCES[1] / 2)
    top1, kl = objective.quality(halfway)
    assert top1 == pytest.approx(1.0 - TOLERANCES[1] / 2) and kl == pytest.approx(TOLERANCES[1] / 20)
    config = EngineConfig(io_mode="direct", cache_policy="lru", cache_bytes=1 << 20)
    assert objective(config) == Objective(fixtures)(config)
    assert objective.evaluations == 1 and objective(config) is objective(config)


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_a_study_reproduces_given_its_seed(fixtures: Fixtures, tiny_model: Path, tmp_path: Path, sampler: str):
    path = write_experiment(
        tmp_path, tiny_model, "bench", "[constraints]\nmax_quality_kl = 0.05\n[budget]\ntrials = 5\n"
    )
    experiment = load_experiment(path)
    context = {"memory_budget": experiment.memory_budget, "model_top_k": fixtures.model_top_k, "cpu_cores": 2}
    bench_runs._load(fixtures)  # what each worker process does first
    task = bench_runs.Task(bench_runs.Setup("plain"), sampler, seed=3, trials=12)
    first = bench_runs.run_task(task, experiment, context)
    assert first == bench_runs.run_task(task, experiment, context)
    assert len(first) == 12 and all(t is not None for t in first)
    other = bench_runs.run_task(bench_runs.Task(bench_runs.Setup("plain"), sampler, 4, 12), experiment, context)
    assert other != first


def test_the_lossless_space_leaves_out_the_knobs_that_change_the_output():
    from search.space import load_space

    names = {p.name for p in bench_runs.lossless_space(load_space("default")).params}
    assert not names & set(bench_runs.LOSSY) and "cache_policy" in names
