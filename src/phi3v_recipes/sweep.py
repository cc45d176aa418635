"""Summary of a multirun sweep: one row per job, its overrides and final metrics.

Hydra calls `SweepSummary.on_multirun_end` after the last job (wired in conf/train.yaml); it writes
`summary.json` and an aligned `summary.txt` into the sweep directory. A job that failed or has not written its
metrics shows as such, so a partial sweep still gets a table.
"""

import json
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from phi3v_recipes.files import atomic_write_text
from phi3v_recipes.report import write_report

COLUMNS = ("eval_before", "eval_after", "train_loss", "train_samples_per_second", "wall_time_s")


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory (numbered subdirectories of the sweep)."""
    rows = []
    jobs = sorted((d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
    for job in jobs:
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        metrics_file = job / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        rows.append({"job": int(job.name), "overrides": overrides, "status": "done" if metrics else "no metrics",
                     **{k: metrics.get(k) for k in COLUMNS}, "metric": metrics.get("metric")})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["job", "overrides", "status", *COLUMNS]

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        if isinstance(value, list):
            return " ".join(value)
        return "-" if value is None else str(value)

    table = [header] + [[cell(row[k]) for k in header] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]]) + "\n"


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = collect(sweep_dir)
        atomic_write_text(sweep_dir / "summary.json", json.dumps(rows, indent=2) + "\n")
        text = format_table(rows)
        atomic_write_text(sweep_dir / "summary.txt", text)
        print(f"\nsweep summary ({sweep_dir / 'summary.txt'}):\n{text}", flush=True)
        write_report(sweep_dir, on_error="warn")  # report.html: jobs ranked, metric per parameter, losses
