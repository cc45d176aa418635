"""`report.html`: what a run or a sweep did, in one self-contained page (plots and thumbnails embedded as data:
URIs, no script, nothing fetched), to open from a cluster's file system or send by mail.

    python -m phi3v_recipes.report <run dir | sweep dir> [key=value ...]    # settings: conf/report.yaml

A run's page: its status; the final figures of metrics.json (before/after, selection score, mean training loss,
best evaluation, early stop); the loss, learning rate and gradient norm of every optimizer step with each resume
marked; the held-out score at each evaluation during training with the best one starred; a gallery of held-out
predictions (thumbnail, question, reference, answer, verdict; wrong answers first); the skipped samples; the
resolved config.yaml. A run that did not finish also gets the end of its train.log; one that failed before it
began (no config.yaml, only status.json, train.log and .hydra/) gets a page all the same. A sweep's page: its jobs ranked by the selection score with their status, the score against
each swept parameter, every job's loss on one plot, and for an Optuna study its best trial and trial history.

`train.run` writes the run's page after metrics.json, and `sweep.SweepSummary` the sweep's page after its
summary, both with `on_error="warn"`: a report that cannot be drawn never fails the run.
"""

import logging
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from phi3v_recipes.errors import ConfigError
from phi3v_recipes.files import atomic_write_text
from phi3v_recipes.rundir import METRICS, RECORD, STATUS

log = logging.getLogger("phi3v_recipes")

REPORT = "report.html"


def load_settings(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/report.yaml with `key=value` overrides; an unknown key or a malformed override is a ConfigError."""
    settings = OmegaConf.create(files("phi3v_recipes.conf").joinpath("report.yaml").read_text(encoding="utf-8"))
    OmegaConf.set_struct(settings, True)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item!r} is not a key=value setting of conf/report.yaml (e.g. gallery.size=20).")
        try:
            settings = OmegaConf.merge(settings, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise ConfigError(f"{item}: {str(err).splitlines()[0]}; see conf/report.yaml for the settings.") from None
    return settings


def write_report(directory: str | Path, settings: DictConfig | None = None,
                 on_error: Literal["raise", "warn"] = "raise") -> Path | None:
    """Write `<directory>/report.html` for the run or sweep in `directory` and return its path.

    on_error="warn" (the automatic report at the end of a run or a sweep): a failure is logged as one warning
    naming the command that retries it, and None is returned; "raise": it propagates."""
    directory = Path(directory)
    try:
        from phi3v_recipes.report.page import run_page, sweep_page
        from phi3v_recipes.report.run_dir import LAUNCH_CONFIG, read_run
        from phi3v_recipes.report.sweep_dir import is_sweep, read_sweep

        if not directory.is_dir():
            raise ConfigError(f"{directory} is not a directory; give a run directory or a sweep directory.")
        settings = settings if settings is not None else load_settings()
        if is_sweep(directory):
            html = sweep_page(read_sweep(directory), settings)
        elif any((directory / name).is_file() for name in (RECORD, METRICS, STATUS, LAUNCH_CONFIG)):
            html = run_page(read_run(directory), settings)  # a failed launch may have left only status.json
        else:
            raise ConfigError(f"{directory} holds neither a run (config.yaml, metrics.json, status.json or "
                              ".hydra/config.yaml) nor a sweep (numbered job directories); give the directory a "
                              "training run or a -m sweep wrote.")
        path = directory / REPORT
        atomic_write_text(path, html)
    except Exception as err:
        if on_error == "raise":
            raise
        log.warning("the report of %s could not be written (%s: %s); python -m phi3v_recipes.report %s retries it",
                    directory, type(err).__name__, err, directory)
        return None
    log.info("report: %s", path)
    return path
