"""What a run directory records, read back for the report: metrics, per-step curves, launches, evaluations.

Every source is optional, so that a run that is still going, failed or was stopped still gets a report:

- `metrics.json` (written when a run ends): the final figures, and when present `steps` (loss, learning rate,
  gradient norm of every optimizer step, exact across resumes), `launches` (the step each launch started at),
  `evals` / `best` / `early_stop` (evaluation during training);
- without `steps`: the newest complete checkpoint's `recipe_state.json` (the exact loss of every step) and
  `trainer_state.json` (learning rate and gradient norm at each logging step);
- without `launches`: the "resuming from ... at step N" lines that each resumed launch appends to `train.log`;
- `status.json` (how the last launch ended), `config.yaml` (what trained the weights), `skipped.txt`;
- a launch that failed before its run began (a bad setting) leaves no config.yaml: then `.hydra/config.yaml`
  (the composed configuration of the last launch, as Hydra saved it) names the task and strategy, and the end of
  `train.log` shows what happened.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from phi3v_recipes.rundir import METRICS, RECORD, SKIPPED, STATUS, checkpoints, read_metrics
from phi3v_recipes.trainer import RECIPE_STATE

Points = list[tuple[int, float]]
"""(optimizer step, value) pairs in step order."""

_RESUMED = re.compile(r"resuming from \S+ at step (\d+)")
LAUNCH_CONFIG = Path(".hydra") / "config.yaml"
"""The composed (unresolved) configuration of a run's last launch, as Hydra saved it."""
LOG = "train.log"


@dataclass
class RunRecord:
    """One run directory, read."""

    run_dir: Path
    metrics: dict[str, Any]
    status: dict[str, Any] | None
    losses: Points = field(default_factory=list)
    learning_rates: Points = field(default_factory=list)
    grad_norms: Points = field(default_factory=list)
    curves_from: str = ""
    """Where the curves were read from, said in the report."""
    resumes: list[int] = field(default_factory=list)
    """The step at which each launch after the first started."""
    config_text: str | None = None
    launch_config_text: str | None = None
    """`.hydra/config.yaml`, read when there is no config.yaml (a launch that failed before its run began)."""
    skipped: list[str] = field(default_factory=list)

    @property
    def config(self) -> DictConfig | None:
        return OmegaConf.create(self.config_text) if self.config_text else None

    def setting(self, key: str, metrics_key: str | None = None) -> str | None:
        """A plain setting of the run (`task.name`): metrics.json's `metrics_key`, else config.yaml's, else the
        last launch's .hydra/config.yaml; None when none of them has it."""
        if metrics_key is not None and self.metrics.get(metrics_key) is not None:
            return str(self.metrics[metrics_key])
        for text in (self.config_text, self.launch_config_text):
            try:
                value = OmegaConf.select(OmegaConf.create(text), key) if text else None
            except Exception:  # noqa: BLE001 - a torn or hand-edited file, an interpolation: it names nothing
                value = None
            if isinstance(value, str | int | float) and not isinstance(value, bool):
                return str(value)
        return None

    @property
    def title(self) -> str:
        """`<task> / <strategy>` as far as the run's files tell, else the run directory's name."""
        known = [v for v in (self.setting("task.name", "task"), self.setting("strategy.name", "strategy")) if v]
        return " / ".join(known) if known else self.run_dir.name

    def log_tail(self, lines: int) -> list[str]:
        """The last `lines` lines of train.log (every launch appends to it), read from its last 64 KiB at most;
        [] without one."""
        path = self.run_dir / LOG
        if not path.is_file() or lines <= 0:
            return []
        with path.open("rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - 65536))
            text = handle.read().decode("utf-8", errors="replace").splitlines()
        if size > 65536:
            text = text[1:]  # the first line read may be cut
        return text[-lines:]

    @property
    def evals(self) -> list[dict[str, Any]] | None:
        """Evaluations during training ({step, score}), or None when the run did not evaluate while training."""
        return self.metrics.get("evals") or None

    @property
    def score(self) -> float | None:
        """The figure runs are compared on: `selection_score` (the final model's score: selection.selection_score),
        else `eval_after`."""
        chosen = self.metrics.get("selection_score")
        return chosen if chosen is not None else self.metrics.get("eval_after")

    @property
    def state(self) -> str:
        """done / failed / stopped (status.json), else done when metrics.json is there, else unfinished."""
        if self.status and self.status.get("status"):
            return str(self.status["status"])
        return "done" if self.metrics else "unfinished"

    @property
    def reason(self) -> str:
        if self.status and self.status.get("reason"):
            return str(self.status["reason"])
        return "" if self.metrics else "no metrics.json: the run failed, was stopped, or is still running"


def read_json(path: Path) -> Any:
    """The parsed file, or None when it does not exist or is not (yet) valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_run(run_dir: Path) -> RunRecord:
    """Everything the report shows about the run in `run_dir`, from whichever files it has."""
    run_dir = Path(run_dir).resolve()
    metrics = read_metrics(run_dir)
    record = RunRecord(run_dir=run_dir, metrics=metrics, status=read_json(run_dir / STATUS))
    _read_curves(record)
    launches = metrics.get("launches")
    if launches:
        record.resumes = [int(launch["start_step"]) for launch in launches[1:]]
    else:
        log = run_dir / LOG
        text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
        record.resumes = [int(step) for step in _RESUMED.findall(text)]
    config = run_dir / RECORD
    record.config_text = config.read_text(encoding="utf-8") if config.is_file() else None
    launch = run_dir / LAUNCH_CONFIG
    if record.config_text is None and launch.is_file():
        record.launch_config_text = launch.read_text(encoding="utf-8")
    skipped = run_dir / SKIPPED
    lines = skipped.read_text(encoding="utf-8").splitlines() if skipped.is_file() else []
    record.skipped = list(dict.fromkeys(line for line in lines if line))
    return record


def _read_curves(record: RunRecord) -> None:
    steps = record.metrics.get("steps")
    if steps:
        record.curves_from = METRICS
        for name, points in (("loss", record.losses), ("learning_rate", record.learning_rates),
                             ("grad_norm", record.grad_norms)):
            points += [(int(s["step"]), float(s[name])) for s in steps if s.get(name) is not None]
        return
    saved = checkpoints(record.run_dir)
    if not saved:
        return
    newest = saved[-1]
    state = read_json(newest / RECIPE_STATE) or {}
    record.losses = [(i + 1, float(loss)) for i, loss in enumerate(state.get("step_losses", []))]
    history = (read_json(newest / "trainer_state.json") or {}).get("log_history", [])
    logged = [entry for entry in history if "loss" in entry]
    record.learning_rates = [(int(e["step"]), float(e["learning_rate"])) for e in logged if "learning_rate" in e]
    record.grad_norms = [(int(e["step"]), float(e["grad_norm"])) for e in logged if e.get("grad_norm") is not None]
    if not record.losses:
        record.losses = [(int(e["step"]), float(e["loss"])) for e in logged]
    record.curves_from = f"{newest.name} ({RECIPE_STATE}, trainer_state.json)"
