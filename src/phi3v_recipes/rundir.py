"""The run directory as the record of one training run: who writes it, what trained it, where it resumes.

- **Lock.** One job at a time: rank 0 holds an exclusive `flock` on `<run dir>/.lock` for the whole run and writes
  its holder (host, pid, start time, command) into it. The kernel releases the lock when the process dies, even by
  `kill -9`, so a lock left behind by a dead process is stale by construction and the next launch takes it over.
- **Complete checkpoints.** A checkpoint is written under `.checkpoint-staging/` and renamed to `checkpoint-N`
  when complete (see `trainer.py`). Whatever is left in the staging area, or a `checkpoint-N` without its trainer
  state (written by an older version, or by hand), is incomplete: reported in one line and removed at start-up.
- **Resume point.** `train.resume`: `auto` (continue from the newest complete checkpoint, or start fresh when there
  is none), `true` (a checkpoint must exist), `false` (the directory must hold no run), or a checkpoint path.
- **What trained the weights.** `config.yaml` is written when a run starts fresh. A resumed run must train the
  same thing: the keys of `SAME_RUN` must be unchanged (`check_same_run`), except those of `MAY_CHANGE`.
"""

import atexit
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from phi3v_recipes.errors import ConfigError, RunStopped
from phi3v_recipes.files import atomic_write_text

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STAGING = ".checkpoint-staging"
LOCK = ".lock"
RECORD = "config.yaml"

# Groups (dotted prefixes of the composed config) that decide which weights a run produces: a resume must keep them.
SAME_RUN = ("model.", "task.", "strategy.", "optim.", "train.", "data.", "hardware.precision")
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

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
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
                f"{self.path.parent} is in use by another run ({holder}); wait for it to finish or stop it, or "
                "choose another run.output_dir."
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
    this launch `extends` it (more epochs or steps); a request that cannot be met raises ConfigError.
    """
    found = checkpoints(run_dir)
    finished = (run_dir / "metrics.json").is_file() and not (extends and found)
    if resume is False or resume is None:
        if found or finished:
            raise ConfigError(f"{run_dir} already holds a run; continue it with train.resume=auto (or true), or "
                              "choose another run.output_dir (nothing there is overwritten).")
        return None
    if resume in ("auto", True):
        if finished:
            raise RunStopped(f"{run_dir} holds a finished run (metrics.json): nothing to train. Choose another "
                             "run.output_dir for a new run.", exit_code=0)
        if found:
            return str(found[-1])
        if resume is True:
            raise ConfigError(f"train.resume=true but {run_dir} holds no complete checkpoint-* directory; pass the run "
                              "to continue as run.output_dir=<its directory>, or train.resume=<checkpoint path>.")
        return None
    if isinstance(resume, str) and Path(resume).is_dir() and is_complete(Path(resume)):
        return resume
    raise ConfigError(f"train.resume={resume} is neither auto, true, false nor a complete checkpoint directory "
                      "(one with a trainer_state.json).")


def _flatten(cfg: DictConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def _governed(key: str) -> bool:
    if any(key == k or key.startswith(k + ".") for k in MAY_CHANGE):
        return False
    return any(key == p or key.startswith(p) for p in SAME_RUN)


def check_same_run(saved: DictConfig, now: DictConfig) -> list[str]:
    """Compare a resumed run's configuration with the one that trained the checkpoint.

    Raises ConfigError naming every governed key that differs, with both values; returns the changes that are
    allowed (`key: old -> new`), for the log.
    """
    old, new = _flatten(saved), _flatten(now)
    forbidden, allowed = [], []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, "<absent>"), new.get(key, "<absent>")
        if before == after:
            continue
        change = f"{key}: {before} -> {after}"
        (forbidden if _governed(key) else allowed).append(change)
    if forbidden:
        raise ConfigError(
            "this run directory was trained with other settings; resuming would mix two runs (" + "; ".join(forbidden)
            + "). Resume with the original values, or start a new run in another run.output_dir."
        )
    return allowed


def extends(saved: DictConfig | None, now: DictConfig) -> bool:
    """True when `now` asks for a longer run than the one recorded (train.epochs or train.max_steps changed)."""
    if saved is None:
        return False
    return any(OmegaConf.select(saved, key) != OmegaConf.select(now, key) for key in ("train.epochs", "train.max_steps"))


def record(cfg: DictConfig, run_dir: Path) -> None:
    """Write the configuration that trains this run's weights."""
    atomic_write_text(run_dir / RECORD, OmegaConf.to_yaml(cfg, resolve=True))


def saved_record(run_dir: Path) -> DictConfig | None:
    path = run_dir / RECORD
    return OmegaConf.load(path) if path.is_file() else None
