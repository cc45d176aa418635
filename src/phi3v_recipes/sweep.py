"""Summary of a multirun sweep: one row per job, its overrides, how it ended and its metrics, best job first.

Hydra calls `SweepSummary.on_multirun_end` after the last job (wired in conf/train.yaml); it writes
`summary.json` and an aligned `summary.txt` into the sweep directory, whatever happened to the jobs: each row
carries the job's `status` (done, failed, stopped: `<job dir>/status.json`, see status.py) and `reason`, and the
rows are sorted by the selection score (higher is better; jobs without one last). When a job did not finish, the
command then exits 1, naming the summary and the command that re-runs the sweep in the same directory: finished
jobs are kept (train.resume=auto finds their metrics.json), stopped jobs resume from their checkpoint and failed
jobs are tried again.

An Optuna study (hydra/sweeper=optuna) is summarised alike. A failed trial there is a result the study has
recorded (Optuna was told it failed) and the study goes on past it; the command still exits 1 at the end, so a
script or scheduler never mistakes a study with failed trials for a clean one.
"""

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from phi3v_recipes.files import atomic_write_text
from phi3v_recipes.report import write_report
from phi3v_recipes.rundir import read_metrics
from phi3v_recipes.status import read_status, selection_score

COLUMNS = ("selection_score", "eval_before", "eval_after", "train_loss", "train_samples_per_second", "wall_time_s")
STUDY_SWEEPER = "hydra_plugins.phi3v_optuna_sweeper.optuna_sweeper.OptunaSweeper"


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job directories of a sweep (its numbered subdirectories), in job order."""
    return sorted((d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))


def job_row(job: Path) -> dict[str, Any]:
    """One job's row: overrides, status and reason, and its final metrics."""
    overrides_file = job / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    metrics = read_metrics(job)
    status = read_status(job)
    if status is None:
        status = ({"status": "done", "reason": "finished (recorded before status.json existed)"} if metrics else
                  {"status": "failed", "reason": "the job ended without recording how (killed?); see its train.log"})
    row = {"job": int(job.name), "overrides": overrides, "status": status["status"], "reason": status["reason"],
           "metric": metrics.get("metric")}
    row.update({k: metrics.get(k) for k in COLUMNS})
    row["selection_score"] = selection_score(metrics) if metrics else None
    return row


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory, the highest selection score first (then job order; jobs without a score last)."""
    rows = [job_row(job) for job in job_dirs(sweep_dir)]
    return sorted(rows, key=lambda r: (r["selection_score"] is None, -(r["selection_score"] or 0.0), r["job"]))


def format_table(rows: list[dict[str, Any]]) -> str:
    """An aligned table of `rows`; the overrides every job shares are named once above it, so that the overrides
    column shows what differs between jobs."""
    shared = [o for o in rows[0]["overrides"] if all(o in r["overrides"] for r in rows)] if rows else []
    header = ["job", "status", *COLUMNS, "overrides", "reason"]

    def cell(key: str, value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        if key == "overrides":
            return " ".join(o for o in value if o not in shared) or "-"
        return "-" if value is None else str(value)

    table = [header] + [[cell(k, row[k]) for k in header] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table]
    common = [f"overrides of every job: {' '.join(shared)}"] if shared else []
    return "\n".join([*common, lines[0], "  ".join("-" * w for w in widths), *lines[1:]]) + "\n"


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write summary.json and summary.txt into `sweep_dir`; return the rows."""
    rows = collect(sweep_dir)
    atomic_write_text(sweep_dir / "summary.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(sweep_dir / "summary.txt", format_table(rows))
    return rows


def rerun_command(sweep_dir: Path) -> str:
    """The command of this sweep, pinned to `sweep_dir` (hydra.sweep.dir) so that it continues there."""
    args = [a for a in sys.argv[1:] if not a.lstrip("+").startswith("hydra.sweep.dir=")]
    return shlex.join(["python", "-m", "phi3v_recipes", *args, f"hydra.sweep.dir={sweep_dir}"])


class SweepSummary(Callback):
    """Hydra callback: the summary of every sweep, and its exit code (see the module docstring)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        if not sweep_dir.is_dir():
            return
        rows = write_summary(sweep_dir)
        text = (sweep_dir / "summary.txt").read_text()
        print(f"\nsweep summary ({sweep_dir / 'summary.txt'}):\n{text}", flush=True)
        write_report(sweep_dir, on_error="warn")  # report.html: jobs ranked, metric per parameter, losses
        unfinished = [r for r in rows if r["status"] != "done"]
        if not unfinished:
            return
        study = str(config.hydra.sweeper.get("_target_", "")) == STUDY_SWEEPER
        if study and all(r["status"] == "failed" for r in unfinished):
            # Failed trials are results of the search (told to Optuna as FAIL); the study went on past them, but the
            # command still says, by its exit code, that not every job it ran finished.
            print(f"error: {len(unfinished)} of {len(rows)} trials failed (jobs "
                  f"{', '.join(str(r['job']) for r in unfinished)}); the study recorded them as failed trials and "
                  f"went on; reasons in {sweep_dir / 'summary.txt'}, the best finished trial in "
                  f"{sweep_dir / 'optimization_results.yaml'}. To continue the study in the same directory "
                  f"(recorded trials are kept):\n  {rerun_command(sweep_dir)}", file=sys.stderr, flush=True)
            sys.exit(1)
        again = ("To continue the study in the same directory (stopped trials resume, recorded ones are kept)" if study
                 else "To re-run the sweep in the same directory (finished jobs are kept, stopped ones resume, failed "
                 "ones run again)")
        print(f"error: {len(unfinished)} of {len(rows)} {'trials' if study else 'jobs'} did not finish ("
              + ", ".join(f"job {r['job']} {r['status']}" for r in unfinished)
              + f"); reasons in {sweep_dir / 'summary.txt'}. {again}:\n  {rerun_command(sweep_dir)}",
              file=sys.stderr, flush=True)
        sys.exit(1)
