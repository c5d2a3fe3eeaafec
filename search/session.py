"""What the search and its confirmation share: the experiment, its study, and the services they report to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from engine.config import EngineConfig
from engine.paths import default_cache_dir
from search import trials as figures
from search.executor import Measurement, RayExecutor
from search.experiment import Experiment
from search.progress import Progress
from search.tracking import Tracker


@dataclass
class Session:
    experiment: Experiment
    model: Path  # the experiment's checkpoint (made from its synthetic preset if it was missing)
    context: dict[str, int]  # what the space's fractions are of: memory budget, the model's top-k, CPU cores
    probe: dict | None  # the disk probe every result's roofline comes from; None: no rooflines
    study: optuna.Study
    tracker: Tracker
    executor: RayExecutor
    stop: Any  # tune's signal handler: ``stop.reason`` is set once a stop is asked for
    progress: Progress

    def measurement(self, config: EngineConfig, quality: bool) -> Measurement:
        """One repeat of ``config`` as the experiment measures it (``quality``: compared with the reference)."""
        experiment = self.experiment
        return Measurement(
            model=str(self.model),
            config=config.to_dict(),
            workload=experiment.workload.name,
            memory_limit=experiment.memory_budget,
            warmup=experiment.warmup,
            timeout_s=experiment.trial_timeout_s,
            quality_cache=str(default_cache_dir()) if quality else None,
            probe=self.probe,
        )

    def describe(self, config: EngineConfig) -> str:
        return figures.describe(config.to_dict(), self.context)
