"""Experiment trackers (`report_to`): MLflow and Weights & Biases, one tracker run per training run.

TensorBoard is Hugging Face's own callback, live at every logging step, with two changes (`TensorBoard`): one log
directory per run, `<run dir>/runs`, for every launch (Hugging Face makes one per launch), and each launch's
writer purges the steps after the one it starts from (its checkpoint's, or 0), which a launch killed between
checkpoints had written and this one trains again; TensorBoard then shows one curve with each step once. MLflow and wandb are ours, over the libraries'
client APIs, because a preempted run must come back to the same tracker run without logging any step twice, which
the stock integrations do not do:

- **One tracker run per training run.** The first launch creates the run and writes its id to
  `<run dir>/trackers.json`; every later launch of the same run directory reopens that run (MLflow: the run id;
  wandb: `id=` with `resume="allow"`).
- **Each step exactly once.** Per-step values (loss, learning rate, gradient norm: `RecipeTrainer.step_records()`)
  and evaluations during training (`RecipeTrainer.evaluations`), which checkpoints carry in `recipe_state.json`,
  are held back and sent when a checkpoint is complete, up to that checkpoint's step, and at the end of training.
  A launch that dies sends nothing past its last checkpoint, and the next launch resumes from that checkpoint;
  what an earlier launch sent is never sent again: the newest step a tracker holds, of each kind (MLflow: read
  back from the store; wandb: `trackers.json`, advanced when a launch closes its run), is a high-water mark, and
  a send goes above it only. What was saved but not sent (a launch killed between a checkpoint and its send)
  comes from the resumed checkpoint's own record. So every step reaches the tracker once, with the value the
  saved weights trained on.
- **Grouped sweeps.** A sweep's jobs go to one MLflow experiment and one wandb group, both named after the sweep
  directory (`tracker.experiment`, `tracker.wandb.group` override); a single run goes to an experiment named
  after the task.

The trade-off: a tracker shows training steps at checkpoint cadence (`train.save_steps`), not live.
"""

import atexit
import importlib.util
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from phi3v_recipes.errors import ConfigError, reason
from phi3v_recipes.files import atomic_write_text
from phi3v_recipes.rundir import flat_config

log = logging.getLogger("phi3v_recipes")

REPORT_TO = ("tensorboard", "mlflow", "wandb", "none")
RECORD = "trackers.json"
"""In the run directory: each tracker's run id (and wandb's last logged step), kept across launches."""
WANDB_MODES = ("online", "offline", "disabled")
STEP_KEYS = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm"}
_BATCH = 900  # metrics per MLflow call (its limit is 1000); whole steps only, so a call never splits a step


def requested(cfg: DictConfig) -> list[str]:
    """The trackers `report_to` names, as a list (`none` or null: empty)."""
    value = cfg.get("report_to")
    names = [value] if isinstance(value, str) else list(value or [])
    return [str(n) for n in names if str(n) != "none"]


class TensorBoard(TensorBoardCallback):
    """Hugging Face's TensorBoard callback writing every launch of a run into `log_dir`; a launch starting at step
    G (0, or the checkpoint it resumed) opens its writer with a purge at step G + 1 (`SummaryWriter(purge_step=)`),
    so TensorBoard drops what an earlier launch logged past that point, the steps this launch trains again."""

    def __init__(self, log_dir: Path):
        super().__init__()
        self.logging_dir = str(log_dir)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.tb_writer is None:
            self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, purge_step=state.global_step + 1)
        super().on_train_begin(args, state, control, **kwargs)


def tensorboard(cfg: DictConfig, run_dir: Path) -> list[TrainerCallback]:
    """The TensorBoard callback when `report_to` names it (Hugging Face's own `report_to` stays empty)."""
    return [TensorBoard(run_dir / "runs")] if "tensorboard" in requested(cfg) else []


def check(cfg: DictConfig) -> None:
    """ConfigError for an unknown tracker, a tracker whose package is missing, or a bad wandb mode (at start-up,
    before any data or model loads)."""
    value = cfg.get("report_to")
    names = [value] if isinstance(value, str) or value is None else list(value)
    for name in names:
        if name not in REPORT_TO and name is not None:
            raise ConfigError(f"report_to={name} is not a tracker this recipe supports; choose from {REPORT_TO}, or "
                              "a list of them (report_to=[tensorboard,mlflow]).")
    chosen = requested(cfg)
    if "tensorboard" in chosen and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("report_to=tensorboard needs tensorboard, which is not installed; pip install tensorboard, "
                          "or set report_to=none.")
    if "mlflow" in chosen:
        missing = [p for p in ("mlflow", "sqlalchemy", "alembic") if importlib.util.find_spec(p) is None]
        uri = mlflow_uri(cfg) or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
        if "://" not in uri or uri.split(":", 1)[0].split("+")[0] not in ("sqlite", "postgresql", "mysql", "mssql"):
            missing = missing[:1]  # a server or file store needs no database driver here
        if missing:
            raise ConfigError(f"report_to=mlflow needs {' and '.join(missing)}, which is not installed; pip install "
                              "'phi3v-recipes[mlflow]', or drop mlflow from report_to.")
    if "wandb" in chosen:
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("report_to=wandb needs wandb, which is not installed; pip install "
                              "'phi3v-recipes[wandb]', or drop wandb from report_to.")
        mode = OmegaConf.select(cfg, "tracker.wandb.mode")
        if mode is not None and mode not in WANDB_MODES:
            raise ConfigError(f"tracker.wandb.mode={mode} is not one of {WANDB_MODES} (or null for $WANDB_MODE).")


def mlflow_uri(cfg: DictConfig) -> str | None:
    return OmegaConf.select(cfg, "tracker.mlflow.tracking_uri")


def sweep_dir() -> Path | None:
    """The sweep directory when this process is a job of a Hydra multirun, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except ValueError:
        return None
    return Path(hydra_cfg.sweep.dir).resolve() if hydra_cfg.mode == RunMode.MULTIRUN else None


def final_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The run's final numbers as `final/<key>` (nested ones such as best.score as `final/best.score`)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in final_values(value).items()})
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def _kinds(values: dict[str, float]) -> set[str]:
    """Which marks a logged row advances: `train` (per-step values), `eval` (an evaluation)."""
    return {key.split("/", 1)[0] for key in values} & {"train", "eval"}


class _Tracker:
    """One tracker run: opened (or reopened) at start, fed rows in step order, finished with the final metrics.

    `marks` holds the newest step it holds of each kind (`train`: per-step values, `eval`: evaluations): rows at or
    below a mark are never sent again. `durable` is what is sure to survive this process (kept in trackers.json)."""

    name = ""
    run_id = ""

    def __init__(self) -> None:
        self.marks = {"train": 0, "eval": 0}
        self.durable = dict(self.marks)

    def log_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Log `(step, {key: value})` rows, in step order, advancing `marks` as they go through."""
        raise NotImplementedError

    def finish(self, final: dict[str, float], step: int, status: str) -> None:
        raise NotImplementedError


class _MLflow(_Tracker):
    name = "mlflow"

    def __init__(self, cfg: DictConfig, run_id: str | None, experiment: str, run_name: str, tags: dict[str, str]):
        from mlflow import MlflowClient

        super().__init__()
        self.client = MlflowClient(tracking_uri=mlflow_uri(cfg))
        params = {k: v if isinstance(v, str) else json.dumps(v) for k, v in flat_config(cfg).items()}  # strings
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
            self._log_params(params)
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            held = self.client.get_run(run_id).data.params
            self._log_params({k: v for k, v in params.items() if k not in held})
            for key, value in params.items():  # a resumed run may change some settings (longer, ...): tags
                if key in held and held[key] != value[:6000]:
                    self.client.set_tag(run_id, f"changed.{key}", f"{held[key]} -> {value}")
        # what earlier launches sent: MLflow commits each batch, so the store itself is the mark
        for kind, key in (("train", STEP_KEYS["loss"]), ("eval", f"eval/{cfg.task.metric}")):
            self.marks[kind] = max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)
        self.durable = self.marks

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k[:250], v[:6000]) for k, v in params.items()])

    def log_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        import time

        from mlflow.entities import Metric

        batch: list[Metric] = []
        kinds: set[str] = set()
        for i, (step, values) in enumerate(rows):
            now = int(time.time() * 1000)
            batch += [Metric(key, value, now, step) for key, value in values.items()]
            kinds |= _kinds(values)
            if i + 1 == len(rows) or len(batch) + len(rows[i + 1][1]) > _BATCH:
                self.client.log_batch(self.run_id, metrics=batch)  # one transaction in a database store
                self.marks.update({kind: step for kind in kinds})
                batch, kinds = [], set()

    def finish(self, final: dict[str, float], step: int, status: str) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if final:
            self.client.log_batch(self.run_id, metrics=[Metric(f"final/{k}", v, now, step) for k, v in final.items()])
        self.client.set_terminated(self.run_id, status=status)


class _Wandb(_Tracker):
    """wandb logs `{"global_step": step, ...}` rows with `global_step` as every chart's x axis (as Hugging Face's
    integration does), so an evaluation that comes late (at the resumed step) still lands at its step."""

    name = "wandb"

    def __init__(self, cfg: DictConfig, run_dir: Path, run_id: str | None, marks: dict[str, int], group: str | None,
                 run_name: str, tags: dict[str, str]):
        import wandb

        super().__init__()
        settings = cfg.tracker.wandb
        self.run = wandb.init(
            project=settings.project, entity=settings.entity, group=group, name=run_name, id=run_id,
            resume="allow", dir=str(run_dir), mode=settings.mode, config=flat_config(cfg),
            notes=tags.get("run_dir"), tags=[tags["sweep_job"]] if "sweep_job" in tags else None,
            allow_val_change=True,
        )
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step", step_sync=True)
        self.run_id = self.run.id
        # wandb buffers its run file (x_transaction_log_flush_interval) and writes it all when the run finishes, and
        # an offline run cannot be asked: trackers.json keeps what earlier launches closed
        self.marks.update({k: int(v) for k, v in marks.items() if k in self.marks})
        self.durable = dict(self.marks)

    def log_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        for step, values in rows:
            self.run.log({"global_step": step, **values})
            self.marks.update({kind: step for kind in _kinds(values)})

    def finish(self, final: dict[str, float], step: int, status: str) -> None:
        for key, value in final.items():
            self.run.summary[f"final/{key}"] = value
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
        self.durable = dict(self.marks)


class Trackers:
    """The MLflow and wandb runs of one training run (rank 0 only; empty elsewhere or when none is requested).

    `open` at start (after the run directory is opened: it knows whether this launch resumes); the trainer's
    `callback` sends steps and evaluations at each checkpoint; `finish` logs the final metrics and closes the
    runs. A launch that ends without `finish` (stopped by a signal, or failed) marks them KILLED or FAILED."""

    def __init__(self, run_dir: Path, trackers: list[_Tracker]):
        self.run_dir = run_dir
        self.trackers = trackers
        self.open_trackers = list(trackers)  # not finished yet
        self.trainer: Any = None  # set by `callback`: whether a stop signal ended the launch
        self._save_record()
        if trackers:
            atexit.register(self._close_unfinished)

    @classmethod
    def open(cls, cfg: DictConfig, run_dir: Path, main: bool) -> "Trackers":
        """Create this run's tracker runs, or reopen the ones `<run dir>/trackers.json` names."""
        chosen = [n for n in requested(cfg) if n != "tensorboard"] if main else []
        path = run_dir / RECORD
        record = json.loads(path.read_text()) if path.is_file() else {}
        sweep = sweep_dir()
        experiment = cfg.tracker.experiment or (str(sweep) if sweep else cfg.task.name)
        run_name = cfg.tracker.run_name or (f"{sweep.name}/{run_dir.name}" if sweep else run_dir.name)
        tags = {"run_dir": str(run_dir.resolve()), "task": cfg.task.name, "strategy": cfg.strategy.name}
        if sweep:
            tags.update(sweep_dir=str(sweep), sweep_job=run_dir.name)
        trackers: list[_Tracker] = []
        for name in chosen:
            held = record.get(name, {})
            try:
                if name == "mlflow":
                    trackers.append(_MLflow(cfg, held.get("run_id"), experiment, run_name, tags))
                else:
                    group = cfg.tracker.wandb.group or (str(sweep)[-128:] if sweep else None)
                    trackers.append(_Wandb(cfg, run_dir, held.get("run_id"), held.get("sent", {}), group, run_name,
                                           tags))
            except ConfigError:
                raise
            except Exception as err:  # noqa: BLE001 - an unreachable server, a locked store, bad credentials ...
                why = reason(err)[:300]
                where = f" ({mlflow_uri(cfg) or os.environ.get('MLFLOW_TRACKING_URI', 'the default store')})" \
                    if name == "mlflow" else ""
                raise ConfigError(f"report_to={name}: could not open the tracker run{where}: {why}; check the "
                                  f"tracker.{name} settings in conf/train.yaml, or drop {name} from "
                                  "report_to.") from None
            verb = "continuing" if held.get("run_id") else "logging to"
            log.info("%s: %s run %s", name, verb, trackers[-1].run_id)
        return cls(run_dir, trackers)

    def callback(self, trainer: Any) -> "TrackerCallback":
        """The callback for `trainer` (a `RecipeTrainer`: its per-step records, evaluations and stop signals)."""
        self.trainer = trainer
        return TrackerCallback(self, trainer)

    def send(self, steps: list[dict[str, Any]], evals: dict[int, dict[str, float]], upto: int) -> None:
        """Send every step and evaluation up to step `upto` that a tracker does not hold yet (`evals`: step ->
        {`eval/<metric>`: score})."""
        for tracker in self.trackers:
            rows: dict[int, dict[str, float]] = {}
            for row in steps:
                if tracker.marks["train"] < row["step"] <= upto:
                    rows[row["step"]] = {STEP_KEYS[k]: float(row[k]) for k in STEP_KEYS if row.get(k) is not None}
            for step, values in evals.items():
                if tracker.marks["eval"] < step <= upto:
                    rows.setdefault(step, {}).update(values)
            if not rows:
                continue
            try:
                tracker.log_rows(sorted(rows.items()))
            except Exception as err:  # noqa: BLE001 - a tracker outage must not end a training run
                log.warning("%s: could not log steps %d-%d (%s); they are sent again with the next checkpoint",
                            tracker.name, min(rows), max(rows), err)
        self._save_record()

    def finish(self, metrics: dict[str, Any], step: int) -> None:
        """Log the final metrics (`final/<key>`) and close the tracker runs as finished."""
        final = final_values(metrics)
        for tracker in self.open_trackers:
            try:
                tracker.finish(final, step, "FINISHED")
            except Exception as err:  # noqa: BLE001 - the run itself is complete; say so and go on
                log.warning("%s: could not log the final metrics to run %s (%s)", tracker.name, tracker.run_id, err)
        self.open_trackers = []
        self._save_record()

    def _close_unfinished(self) -> None:
        signals = getattr(self.trainer, "stop_signals", None)
        stopped = self.trainer is not None and (self.trainer.stopped_by is not None
                                                or (signals is not None and signals.received is not None))
        for tracker in self.open_trackers:
            try:
                tracker.finish({}, 0, "KILLED" if stopped else "FAILED")
            except Exception as err:  # noqa: BLE001 - the process is exiting; the run stays RUNNING in the tracker
                log.warning("%s: could not close run %s (%s)", tracker.name, tracker.run_id, err)
        self.open_trackers = []
        self._save_record()

    def _save_record(self) -> None:
        if not self.trackers:
            return
        record = {t.name: {"run_id": t.run_id, "sent": t.durable} for t in self.trackers}
        atomic_write_text(self.run_dir / RECORD, json.dumps(record, indent=2) + "\n")


class TrackerCallback(TrainerCallback):
    """Sends the trainer's recorded steps and evaluations to the trackers when a checkpoint is complete (they are
    then part of the saved run) and when training ends."""

    def __init__(self, trackers: Trackers, trainer: Any):
        self.trackers = trackers
        self.trainer = trainer

    def _send(self, upto: int) -> None:
        metric = self.trainer.recipe.task.metric
        evals = {e["step"]: {f"eval/{metric}": float(e["score"])} for e in self.trainer.evaluations.evals}
        self.trackers.send(self.trainer.step_records(), evals, upto)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for tracker in self.trackers.trackers:
            if tracker.marks["train"] > state.global_step:  # resumed from an older checkpoint (train.resume=<path>)
                log.warning("%s already holds steps %d-%d from an earlier launch; they keep those values and the "
                            "retrained steps are not sent again", tracker.name, state.global_step + 1,
                            tracker.marks["train"])
        self._send(state.global_step)  # what the resumed checkpoint saved and no earlier launch sent for sure

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._send(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._send(state.global_step)
