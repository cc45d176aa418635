"""A sweep directory read back for the report: one entry per job (its swept values, status and score), the
parameters that vary between jobs, and, for an Optuna study, its best trial.

Jobs are those `sweep.collect` finds, with its score (none unless the job is done); each is read like a run
(`run_dir.read_run`). A
study is recognised by the sweeper's `optimization_results.yaml` (best_params, best_value) or by an Optuna sweeper
in the sweep's `multirun.yaml`; its trials are its jobs, in job order.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from phi3v_recipes.report.run_dir import RunRecord, read_run
from phi3v_recipes.sweep import collect


@dataclass
class Job:
    number: int
    dir: str
    """The job's directory, relative to the sweep's (its number unless hydra.sweep.subdir says otherwise)."""
    overrides: list[str]
    run: RunRecord
    score: float | None
    """The selection score of the job's finished run (sweep.collect); None unless the job is done."""

    @property
    def values(self) -> dict[str, str]:
        """The job's command-line overrides as key -> value text."""
        pairs = (item.split("=", 1) for item in self.overrides if "=" in item)
        return {key.lstrip("+~"): value for key, value in pairs}


@dataclass
class Study:
    maximize: bool
    best_params: dict[str, Any] = field(default_factory=dict)
    best_value: float | None = None


@dataclass
class SweepRecord:
    sweep_dir: Path
    jobs: list[Job]
    swept: list[str]
    """Override keys given two or more values across the jobs (all override keys when there is one job)."""
    metric: str
    study: Study | None

    def ranked(self) -> list[Job]:
        """Jobs by score, best first (the task metric is higher-is-better); jobs without a score last, in job
        order."""
        scored = sorted((j for j in self.jobs if j.score is not None), key=lambda j: -j.score)
        return scored + [j for j in self.jobs if j.score is None]


def is_sweep(directory: Path) -> bool:
    """A Hydra multirun directory: numbered job subdirectories, or the sweep's own files."""
    if (directory / "multirun.yaml").is_file() or (directory / "summary.json").is_file():
        return True
    return any(d.is_dir() and d.name.isdigit() and (d / ".hydra").is_dir() for d in directory.iterdir())


def read_sweep(sweep_dir: Path) -> SweepRecord:
    sweep_dir = Path(sweep_dir).resolve()
    jobs = [Job(row["job"], row["dir"], list(row["overrides"] or []), read_run(sweep_dir / row["dir"]),
                row["selection_score"]) for row in collect(sweep_dir)]
    keys = list(dict.fromkeys(k for job in jobs for k in job.values))
    swept = [k for k in keys if len({job.values[k] for job in jobs if k in job.values}) > 1 or len(jobs) == 1]
    metric = next((j.run.metrics["metric"] for j in jobs if j.run.metrics.get("metric")), "score")
    return SweepRecord(sweep_dir=sweep_dir, jobs=jobs, swept=swept, metric=metric, study=_study(sweep_dir))


def _study(sweep_dir: Path) -> Study | None:
    results_file, multirun_file = sweep_dir / "optimization_results.yaml", sweep_dir / "multirun.yaml"
    multirun = yaml.safe_load(multirun_file.read_text()) if multirun_file.is_file() else {}
    sweeper = ((multirun or {}).get("hydra") or {}).get("sweeper") or {}
    if not results_file.is_file() and "optuna" not in str(sweeper.get("_target_", "")).lower():
        return None
    direction = sweeper.get("direction", "maximize")
    direction = direction[0] if isinstance(direction, list) else direction
    study = Study(maximize=str(direction).lower().endswith("maximize"))
    results = yaml.safe_load(results_file.read_text()) if results_file.is_file() else None
    if results:
        study.best_params = dict(results.get("best_params") or {})
        study.best_value = results.get("best_value")
    return study
