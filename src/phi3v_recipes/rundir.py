"""The run directory as the record of one training run: who writes it, what trained it, where it resumes.

- **Lock.** One job at a time: rank 0 holds an exclusive `flock` on `<run dir>/.lock` for the whole run and writes
  its holder (host, pid, start time, command) into it. The kernel releases the lock when the process dies, even by
  `kill -9`, so a lock left behind by a dead process is stale by construction and the next launch takes it over.
- **Complete checkpoints.** A checkpoint is written under `.checkpoint-staging/` and renamed to `checkpoint-N`
  when complete (see `trainer.py`). Whatever is left in the staging area, or a `checkpoint-N` without its trainer
  state (written by an older version, or by hand), is incomplete: reported in one line and removed at start-up.
- **Resume point.** `train.resume`: `auto` (continue from the newest complete checkpoint, or start fresh when there
  is none), `true` (a checkpoint must exist), `false` (the directory must hold no run), or a checkpoint path.
- **What trained the weights.** `config.yaml` is written when a run starts fresh, and into every checkpoint as it
  stood for the launch that wrote it. A resumed run must train the same thing: the keys of `SAME_RUN` must be
  unchanged (`check_same_run`), except those of `MAY_CHANGE`, against both records.
- **Its files.** The names of what a run directory holds (`METRICS`, `SKIPPED`, `RECORD`, ...) live here, with the
  functions that read and write them; `open_run_dir` is the whole opening of a run (lock, clean-up, resume point,
  record) that the recipe calls first.
"""

import atexit
import fcntl
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from phi3v_recipes.cluster import resume_command
from phi3v_recipes.errors import ConfigError, RunStopped, reason
from phi3v_recipes.files import atomic_write_text

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STAGING = ".checkpoint-staging"
LOCK = ".lock"
RECORD = "config.yaml"  # the resolved configuration that trains the run's weights
METRICS = "metrics.json"  # written when a run finishes: its presence marks a finished run
PREVIOUS_METRICS = "metrics.previous.json"  # every earlier finished record of a run that later launches extended:
                                           # a JSON list of metrics.json's, oldest first (read_previous_metrics)
SKIPPED = "skipped.txt"  # one problem sentence per bad sample dropped under data.on_error=skip
STATUS = "status.json"  # how the last launch ended: done, failed or stopped, with its reason (status.py)

# Groups (dotted prefixes of the composed config) that decide which weights a run produces, and the keys that decide
# which of its weights are kept and how they are scored: a resume must keep them.
SAME_RUN = (
    "model.", "task.", "strategy.", "optim.", "train.", "data.", "hardware.precision",
    # The held-out set and how an answer is generated for scoring: the best evaluation is chosen among scores of
    # every launch (selection.py), and eval_before is reused from the first launch, so a resume that evaluated
    # other samples (eval.max_samples; the task's split and size are under task.) or generated differently
    # (eval.max_new_tokens) would compare scores of different tests. eval.batch_size may change: it changes how
    # many prompts are padded together, the rounding, not the samples or the answer's length (like
    # model.attn_implementation below).
    "eval.max_samples",
    "eval.max_new_tokens",
    # Which weights become the final model. Refused, not applied, even for a relaunch of a finished run that trains
    # nothing: its final model was already chosen (and the checkpoints the other choice needs may be rotated away,
    # since rotation keeps the best one only under keep_best), so a launch that trains nothing cannot apply the new
    # value, and recording it in config.yaml would describe a model the run does not hold. A resume that turned it
    # on would look for a best checkpoint that rotation did not keep.
    "eval.keep_best",
)
# Keys inside those groups that a resumed run may change: the run's length, checkpointing and logging cadence,
# how bad samples are handled, DataLoader and screening workers, and how the model runs (attention back-end, not
# its maths).
MAY_CHANGE = (
    "train.resume",
    "train.epochs",
    "train.max_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.logging_steps",
    "data.num_workers",
    "data.screen_workers",
    "data.on_error",
    "model.attn_implementation",
)


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / "trainer_state.json").is_file()


def checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of `run_dir`, oldest first (by step)."""
    found = [p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted((p for p in found if is_complete(p)), key=checkpoint_step)


def remove_incomplete(run_dir: Path) -> list[str]:
    """Delete what an interrupted checkpoint write left behind; return the names removed."""
    removed = []
    staging = run_dir / STAGING
    if staging.exists():
        removed += [p.name for p in staging.iterdir()] or [STAGING]
        shutil.rmtree(staging)
    for path in run_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        if path.is_dir() and not is_complete(path):
            removed.append(path.name)
            shutil.rmtree(path)
    return sorted(removed)


class RunLock:
    """An exclusive lock on a run directory for the life of this process (see the module docstring)."""

    def __init__(self, run_dir: Path, setting: str = "run.output_dir"):
        self.path, self.setting = run_dir / LOCK, setting
        self.handle: Any = None
        self.took_over: dict | None = None

    def acquire(self) -> None:
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(self.path))
            handle.close()
            raise ConfigError(
                f"{self.path.parent} is in use by another {'sweep' if self.setting.startswith('hydra.') else 'run'} "
                f"({holder}); wait for it to finish or stop it, or "
                f"choose another {self.setting}."
            ) from None
        except OSError as err:  # e.g. a Lustre mount without flock: run unguarded rather than not at all
            log.warning("cannot lock %s (%s): this file system has no flock; a second job started in this run "
                        "directory will not be detected", self.path, err.strerror or err)
        self.took_over = _read_holder(self.path) or None
        handle.seek(0)
        handle.truncate()
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        handle.write(json.dumps(holder) + "\n")
        handle.flush()
        self.handle = handle
        atexit.register(self.release)  # any exit but a kill leaves the lock file empty: a holder left in it is stale

    def release(self) -> None:
        if self.handle is not None:
            self.handle.seek(0)
            self.handle.truncate()
            self.handle.close()  # closing the descriptor releases the flock
            self.handle = None


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: {holder.get('command')}"


def resume_point(resume: Any, run_dir: Path, extends: bool = False) -> str | None:
    """The checkpoint to continue from, or None to start fresh (see the module docstring).

    A finished run under `auto`/`true` raises RunStopped with exit code 0 (relaunching it trains nothing), unless
    this launch `extends` it (more optimizer steps than its newest checkpoint holds: check_length); a request that
    cannot be met raises ConfigError.
    """
    found = checkpoints(run_dir)
    finished = (run_dir / METRICS).is_file() and not (extends and found)
    if resume is False or resume is None:
        if found or finished:
            raise ConfigError(f"{run_dir} already holds a run; continue it with train.resume=auto (or true), or "
                              "choose another run.output_dir (nothing there is overwritten).")
        return None
    if resume in ("auto", True):
        if finished:
            raise RunStopped(f"{run_dir} holds a finished run ({METRICS}): nothing to train. Choose another "
                             "run.output_dir for a new run.", exit_code=0)
        if found:
            return str(found[-1])
        if resume is True:
            raise ConfigError(f"train.resume=true but {run_dir} holds no complete checkpoint-* directory; pass the run "
                              "to continue as run.output_dir=<its directory>, or train.resume=<checkpoint path>.")
        return None
    if isinstance(resume, str) and Path(resume).is_dir() and is_complete(Path(resume)):
        chosen = Path(resume)
        here = chosen.resolve().parent == run_dir.resolve() and chosen.resolve() in [c.resolve() for c in found]
        later = [c.name for c in found if here and checkpoint_step(c) > checkpoint_step(chosen.resolve())]
        if later:
            # Going back in place would grow a second history beside the first: rotation (save_total_limit) keeps
            # the newest steps, the old branch's, and deletes the new ones, and train.resume=auto continues theirs.
            raise ConfigError(f"train.resume={resume} is not the newest checkpoint of {run_dir}: "
                              f"{', '.join(later)} came after it, and resuming from it there would mix two histories "
                              f"of the run. To go back to {chosen.name}, move {', '.join(later)} out of the run "
                              "directory first; or continue from it in a new run: "
                              f"train.resume={resume} run.output_dir=<another directory>.")
        return resume
    raise ConfigError(f"train.resume={resume} is neither auto, true, false nor a complete checkpoint directory "
                      "(one with a trainer_state.json).")


def flat_config(cfg: DictConfig, resolve: bool = True) -> dict[str, Any]:
    """The resolved configuration as `group.key: value` (`optim.lr: 2e-05`, `optim.betas: [0.9, 0.95]`): what a
    resume compares and what the trackers log as parameters. With `resolve=False`, interpolations stay as written
    (`${task.name}`): a sweep's configuration, compared before any job resolves it."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=resolve), "")
    return flat


def _governed(key: str) -> bool:
    if any(key == k or key.startswith(k + ".") for k in MAY_CHANGE):
        return False
    return any(key == p or key.startswith(p) for p in SAME_RUN)


def setting_changes(saved: DictConfig, now: DictConfig, resolve: bool = True) -> tuple[list[str], list[str]]:
    """The keys that differ between two configurations as `key: old -> new`: (those a resume must keep, those it
    may change)."""
    old, new = flat_config(saved, resolve), flat_config(now, resolve)
    forbidden: list[str] = []
    allowed: list[str] = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, "<absent>"), new.get(key, "<absent>")
        if before == after:
            continue
        change = f"{key}: {before} -> {after}"
        (forbidden if _governed(key) else allowed).append(change)
    return forbidden, allowed


def check_same_run(saved: DictConfig, now: DictConfig, trained_by: str = "this run directory") -> list[str]:
    """Compare a resumed run's configuration with the one that trained the checkpoint (`trained_by` names it).

    Raises ConfigError naming every governed key that differs, with both values; returns the changes that are
    allowed (`key: old -> new`), for the log.
    """
    forbidden, allowed = setting_changes(saved, now)
    if forbidden:
        raise ConfigError(
            f"{trained_by} was trained with other settings; resuming would mix two runs (" + "; ".join(forbidden)
            + "). Resume with the original values, or start a new run in another run.output_dir."
        )
    return allowed


def check_foreign_checkpoint(checkpoint: Path, cfg: DictConfig) -> list[str]:
    """`train.resume=<a checkpoint of another run>`: the same checks as a resume in place, against what trained
    that checkpoint. Its weights must be of this strategy's kind (a LoRA adapter for strategy.lora, full weights
    otherwise), and its run's recorded configuration (config.yaml beside it or one level up) must agree on the
    keys of SAME_RUN; a checkpoint without one is only checked for its kind, with a warning. Returns the allowed
    changes; raises ConfigError otherwise."""
    lora_checkpoint = (checkpoint / "adapter_config.json").is_file()
    if lora_checkpoint != bool(cfg.strategy.get("lora")):
        held = "a LoRA adapter" if lora_checkpoint else "full model weights, no LoRA adapter"
        raise ConfigError(f"train.resume={checkpoint} holds {held}, but strategy={cfg.strategy.name} "
                          f"{'trains one' if not lora_checkpoint else 'trains full weights'}; resume it with the "
                          "strategy that wrote it, or start this run fresh (train.resume=auto in a new "
                          "run.output_dir).")
    saved = run_config(checkpoint)
    if saved is None:
        log.warning("train.resume=%s has no recorded configuration (no %s beside it or in its run directory): "
                    "only its kind of weights was checked, not the settings that trained it", checkpoint, RECORD)
        return []
    return check_same_run(saved, cfg, trained_by=f"train.resume={checkpoint}")


def trained_length(checkpoint: Path) -> tuple[int, int | None]:
    """The optimizer steps `checkpoint` holds, and the steps of one epoch of its run: recorded in its
    recipe_state.json, else (a checkpoint of an older version) read from its trainer state's step and epoch."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    step, epoch = int(state.get("global_step", 0)), float(state.get("epoch") or 0)
    try:
        per_epoch = json.loads((checkpoint / "recipe_state.json").read_text()).get("steps_per_epoch")
    except (OSError, ValueError):
        per_epoch = None
    if per_epoch is None and step > 0 and epoch > 0:
        per_epoch = max(1, round(step / epoch))
    return step, per_epoch


def _length(cfg: DictConfig) -> str:
    """How a configuration sets its length: `train.max_steps=N` when positive (it wins), else `train.epochs=E`."""
    steps = OmegaConf.select(cfg, "train.max_steps")
    return f"train.max_steps={steps}" if steps is not None and steps > 0 else f"train.epochs={cfg.train.epochs}"


def check_length(checkpoint: Path, cfg: DictConfig, saved: DictConfig | None = None) -> bool:
    """Whether `cfg` asks for more optimizer steps than `checkpoint` trained (a finished run is then extended).

    A launch never trains past its length, so one that asks for fewer steps than the checkpoint holds (a shorter
    train.max_steps or train.epochs than the run was given) raises ConfigError naming both, before anything in the
    run directory changes. The same number of steps is no extension: a finished run stays finished, an
    interrupted one finishes from there without training (trainer.RecipeTrainer.on_train_begin)."""
    trained, per_epoch = trained_length(checkpoint)
    if cfg.train.max_steps > 0:
        asked, how = cfg.train.max_steps, ""
    elif per_epoch is not None:
        asked = math.ceil(cfg.train.epochs * per_epoch)  # as transformers computes it
        how = f" ({per_epoch} per epoch)"
    else:
        return True  # unknown: the trainer still stops at the checkpoint's step (RecipeTrainer.on_train_begin)
    if asked >= trained:
        return asked > trained
    own = f"its run's own length ({_length(saved)}, as its {RECORD} says) or longer" if saved is not None else \
        f"a length of at least {trained} steps"
    ends_here = f"train.max_steps={trained}"
    where = f" ({ends_here} finishes the run where it is)" if saved is None or _length(saved) != ends_here else ""
    raise ConfigError(
        f"{checkpoint} has already trained {trained} steps, more than the {asked} that {_length(cfg)} asks for{how}, "
        f"and a launch never trains past its length nor undoes steps: relaunch with {own}{where}, or start a new "
        "run in another run.output_dir.")


def record(cfg: DictConfig, run_dir: Path) -> None:
    """Write the configuration that trains this run's weights."""
    atomic_write_text(run_dir / RECORD, OmegaConf.to_yaml(cfg, resolve=True))


def load_record(path: Path) -> DictConfig:
    """The recorded configuration at `path`; ConfigError naming the file when it is not one (edited by hand, torn)."""
    try:
        record = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - yaml's parser and OmegaConf raise many kinds
        raise ConfigError(f"{path} is not a readable run record ({reason(err)}); restore it (the run's .hydra/config.yaml "
                          "holds the composed settings of its first launch) or start a new run.output_dir.") from None
    if not isinstance(record, DictConfig):
        raise ConfigError(f"{path} is not a run record (no settings in it); restore it (the run's .hydra/config.yaml "
                          "holds the composed settings of its first launch) or start a new run.output_dir.")
    return record


def saved_record(run_dir: Path) -> DictConfig | None:
    path = run_dir / RECORD
    return load_record(path) if path.is_file() else None


def run_config(path: str | Path) -> DictConfig | None:
    """The recorded configuration of the run that `path` (a run directory or one of its checkpoint-* directories)
    belongs to; None for a model that does not come from a run of ours."""
    directory = Path(path)
    if not directory.is_dir():
        return None
    for candidate in (directory / RECORD, directory.parent / RECORD):
        if candidate.is_file():
            return load_record(candidate)
    return None


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """The finished run's `metrics.json`, or {} when there is none yet (or it is not valid JSON)."""
    try:
        return json.loads((run_dir / METRICS).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def read_previous_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every `metrics.json` this run had before later launches extended it (a larger train.max_steps or
    train.epochs), oldest first; [] when it was never extended. A single record (the format of versions that kept
    only the latest one) reads as a list of one."""
    path = run_dir / PREVIOUS_METRICS
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ConfigError(f"{path} is not valid JSON ({reason(err)}); restore it or move it away (it holds the "
                          "metrics of this run's earlier finishes), then launch again.") from None
    return [records] if isinstance(records, dict) else list(records)


def set_aside_metrics(run_dir: Path) -> None:
    """A finished run is being extended: its `metrics.json` joins the earlier records in `metrics.previous.json`
    (appended, never overwriting one), then stops marking the run finished. The list is written before
    metrics.json is removed, and a record equal to the last one kept is not added twice, so an interruption in
    between loses and repeats nothing."""
    path = run_dir / METRICS
    try:
        current = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ConfigError(f"{path} is not valid JSON ({reason(err)}); restore it or move it away, then launch "
                          "again to extend the run.") from None
    records = read_previous_metrics(run_dir)
    if not records or records[-1] != current:
        records.append(current)
        atomic_write_text(run_dir / PREVIOUS_METRICS, json.dumps(records, indent=2) + "\n")
    path.unlink()


def read_skipped(run_dir: Path) -> list[str]:
    """The distinct problems listed in `<run dir>/skipped.txt` (before and during training, over every launch)."""
    path = run_dir / SKIPPED
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return list(dict.fromkeys(line for line in lines if line))


def record_skipped(run_dir: Path, problems: list[str]) -> None:
    """Add the problems found before training to `skipped.txt`, keeping what earlier launches listed."""
    merged = list(dict.fromkeys(read_skipped(run_dir) + problems))
    if merged:
        atomic_write_text(run_dir / SKIPPED, "".join(f"{p}\n" for p in merged))


def append_skipped(run_dir: Path, problems: list[str]) -> None:
    """Append problems met while training to `skipped.txt` (cheap: one write per batch that has any)."""
    if problems:
        with (run_dir / SKIPPED).open("a", encoding="utf-8") as handle:
            handle.write("".join(f"{p}\n" for p in problems))


def open_run_dir(cfg: DictConfig, run_dir: Path, main: bool) -> tuple[RunLock | None, str | None]:
    """Rank 0 locks the run directory, removes incomplete checkpoints, decides where to resume and records (or
    checks) the configuration; every rank gets the same checkpoint to resume from, or the same error.

    A fresh run records its configuration at once. A resumed run whose allowed settings changed (a longer run, ...)
    records them with its first checkpoint, once they have trained something (`RecipeTrainer.pending_record`)."""
    import torch.distributed as dist

    outcome: Any = None
    lock = None
    if main:
        try:
            lock, resume = _open_run_dir(cfg, run_dir)
            outcome = resume
        except (ConfigError, RunStopped) as err:
            outcome = err
    if dist.is_available() and dist.is_initialized():
        shared = [outcome]
        dist.broadcast_object_list(shared, src=0)
        outcome = shared[0]
    if isinstance(outcome, Exception):
        raise outcome
    return lock, outcome


_OPENED: set[Path] = set()  # run directories this process opened to train in (rank 0)


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run that trained something or began to: its record, a checkpoint or metrics."""
    return (run_dir / RECORD).exists() or (run_dir / METRICS).exists() or bool(checkpoints(run_dir))


def owns_status(run_dir: Path) -> bool:
    """Whether this launch may record how it ended in `run_dir`'s status.json: it opened the directory to train
    there, or the directory holds no run (a fresh run or sweep job that failed before it began). A launch that was
    refused (another run's settings, a finished run, a busy lock) leaves the run's own record alone."""
    return run_dir.resolve() in _OPENED or not holds_run(run_dir)


def _open_run_dir(cfg: DictConfig, run_dir: Path) -> tuple[RunLock, str | None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    lock.acquire()
    if lock.took_over:
        log.info("took over the lock of %s, whose process no longer runs", run_dir)
    removed = remove_incomplete(run_dir)
    if removed:
        log.warning("removed incomplete checkpoint(s) left by an interrupted run: %s", ", ".join(removed))
    saved = saved_record(run_dir)
    changes: list[str] = []
    found = checkpoints(run_dir)
    if saved is not None and cfg.train.resume is not False and (found or (run_dir / METRICS).exists()):
        changes = check_same_run(saved, cfg)  # before anything else: a changed run must not even look finished
    # A launch shorter than the checkpoint it would continue from is refused before anything changes; one of the
    # same length does not extend a finished run (check_length).
    longer = cfg.train.resume in ("auto", True) and bool(found) and check_length(found[-1], cfg, saved)
    resume = resume_point(cfg.train.resume, run_dir, longer)
    if resume is not None and Path(resume).resolve().parent != run_dir.resolve():
        changes = check_foreign_checkpoint(Path(resume), cfg)
    elif resume is not None and (Path(resume) / RECORD).is_file():  # the checkpoint's own record: a config.yaml
        changes = check_same_run(load_record(Path(resume) / RECORD), cfg,  # edited by hand cannot hide a change
                                 trained_by=f"{Path(resume).name} (its {RECORD})")
    if resume is not None and cfg.train.resume not in ("auto", True):  # train.resume=<path>: that checkpoint's run
        here = Path(resume).resolve().parent == run_dir.resolve()
        check_length(Path(resume), cfg, saved if here else run_config(resume))
    if resume is not None and changes:
        log.info("resuming with changed settings: %s", "; ".join(changes))
    if resume is None or saved is None:
        record(cfg, run_dir)
    if resume is not None and (run_dir / METRICS).is_file():  # a finished run, extended: no longer final
        set_aside_metrics(run_dir)
    (run_dir / STATUS).unlink(missing_ok=True)  # this launch trains here: how it ends replaces how the last one did
    _OPENED.add(run_dir.resolve())
    log.info("%s", f"resuming from {resume}" if resume else f"starting a new run in {run_dir} (if it is interrupted: "
             f"{resume_command(run_dir)} to resume)")
    return lock, resume
