"""How a training launch ended, in `<run dir>/status.json`, and the task function that records it.

    {"status": "done" | "failed" | "stopped", "reason": "<one sentence>", "exit_code": <int>}

Every launch of `python -m phi3v_recipes` that trains in a run directory, or fails before a fresh one holds a
run, writes it when it ends (rank 0; single runs and sweep jobs alike): done (exit 0), stopped (a stop signal saved a checkpoint: exit
128 + the signal; the same command continues it) or failed (a configuration or data mistake: 2, divergence: 1,
out of memory or any other exception: 1). A launch that is killed outright (kill -9, the OOM killer) writes
nothing; a stale file from an earlier launch is removed when the next one opens the directory to train. A
single run's launch refused at the door of an existing run (a finished run relaunched, other settings, a busy
lock) leaves the run's own status alone (`rundir.owns_status`). A sweep job's is recorded whatever it found: the
summary and an Optuna study read each job's status as how that job of this launch ended, so a refused job is
failed, never the done of what its directory trained before (and a finished job is done again once a later
launch finds it finished).

In a sweep (`-m`) a failed job must not end the sweep: `train_and_record` then returns instead of raising, and
the sweep goes on to its next job (`sweep.SweepSummary` tabulates every job's status at the end). A stopped job
is different: a stop signal to a sweep that runs its jobs in this process (Hydra's basic launcher) means the
whole sweep is being preempted or interrupted, so the remaining jobs do not start; the summary so far is written
and the process exits with the job's code. Re-running the sweep command continues where it stopped. Under the
submitit launchers each job is its own process and is requeued (or recorded as stopped) on its own.
"""

import gc
import json
import logging
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from phi3v_recipes.cli import exit_on_user_error, log_to_files
from phi3v_recipes.cluster import in_submitit_job, rank
from phi3v_recipes.files import atomic_write_text
from phi3v_recipes.rundir import STATUS, owns_status, read_metrics

STATUSES = ("done", "failed", "stopped")

log = logging.getLogger("phi3v_recipes")


def write_status(run_dir: Path, status: str, reason: str, exit_code: int) -> None:
    """Record how the launch in `run_dir` ended (atomically)."""
    assert status in STATUSES, status
    record = {"status": status, "reason": reason, "exit_code": exit_code}
    atomic_write_text(run_dir / STATUS, json.dumps(record, indent=2) + "\n")


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The recorded status of `run_dir`, or None when no launch recorded one."""
    path = run_dir / STATUS
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def selection_score(metrics: dict[str, Any]) -> float | None:
    """The score a run is compared by: `selection_score` in metrics.json (the held-out score of the model the run
    kept, `selection.selection_score`), else `eval_after` for runs recorded before that key existed. Higher is
    better for every task."""
    if "selection_score" in metrics:
        return metrics["selection_score"]
    return metrics.get("eval_after")


def _multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def _job_dir(cfg: DictConfig) -> Path | None:
    """The directory Hydra made for this launch (the run directory, or the sweep job's directory)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        try:
            return Path(cfg.run.output_dir)
        except Exception:  # noqa: BLE001 - an unresolvable run.output_dir: nowhere to record
            return None


def _outcome(code: Any, error: BaseException | None) -> tuple[str, str, int]:
    """(status, reason, exit code) of a launch that ended with SystemExit(code) after `error`."""
    exit_code = code if isinstance(code, int) else (0 if code is None else 1)
    reason = str(error).strip() if error is not None and not isinstance(error, SystemExit) else ""
    if isinstance(error, KeyboardInterrupt) and not reason:
        reason = "interrupted (Ctrl-C) outside training: before it started or after it ended (say, in the final evaluation)"
    if exit_code == 0:  # the run had already finished (metrics.json): relaunching it trains nothing
        return "done", "finished by an earlier launch; this launch trained nothing", 0
    if exit_code > 128 or exit_code < 0:  # 128 + a stop signal; submitit's requeue exits with -1
        return "stopped", reason or f"stopped with exit code {exit_code}", exit_code
    return "failed", reason or f"exited with code {exit_code}", exit_code


def train_and_record(run: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig) -> float | None:
    """Run `run(cfg)` behind `cli.exit_on_user_error`, record the outcome in the run directory's status.json, and
    return the run's selection score (None when it has none or failed).

    A single run exits as before (its code, its one sentence). A sweep job that fails returns None so that the
    sweep goes on; one that a stop signal ended stops the sweep (see the module docstring)."""
    job_dir, main, multirun = _job_dir(cfg), rank() == 0, _multirun()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}
    seen: list[BaseException] = []

    def watched(cfg: DictConfig) -> dict[str, Any]:
        try:
            return run(cfg)
        except BaseException as err:
            seen.append(err)
            raise

    def record(status: str, reason: str, exit_code: int) -> None:
        if not (main and job_dir is not None and job_dir.is_dir()):
            return
        if owns_status(job_dir) or (multirun and status != "done"):
            write_status(job_dir, status, reason, exit_code)
        elif multirun and (read_status(job_dir) or {}).get("status") != "done":
            # a finished job that a launch of the sweep refused since (its status says failed): done again
            write_status(job_dir, "done", done_reason(read_metrics(job_dir)), 0)

    try:
        metrics = exit_on_user_error(watched, cfg)
    except SystemExit as stop:
        error = seen[0] if seen else stop.__context__  # a refusal before the run (a +key nothing reads)
        status, reason, exit_code = _outcome(stop.code, error)
        seen.clear()
        if isinstance(error, SystemExit) and in_submitit_job():  # submitit requeued a preempted job and exits
            record("stopped", f"ended by the cluster launcher (exit code {exit_code}), e.g. requeued after a "
                   "preemption or time-out", exit_code)
            raise
        record(status, reason, exit_code)
        if not multirun:
            raise
        if status == "done":  # a finished job of an earlier launch of this sweep: nothing was trained
            return selection_score(read_metrics(job_dir) if job_dir is not None else {})
        _restore(handlers)
        if status == "stopped" and not in_submitit_job():
            _stop_sweep(exit_code)
        return None
    except Exception as err:  # noqa: BLE001 - out of memory or a bug: the job fails, a sweep goes on
        seen.clear()
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else 'no message'}"
        record("failed", reason, 1)
        if not multirun:
            raise
        log_to_files("".join(traceback.format_exception(err)).rstrip(), logging.ERROR)
        where = f" (traceback in {job_dir / 'train.log'})" if job_dir is not None else ""
        print(f"error: this sweep job failed with {reason}{where}", file=sys.stderr, flush=True)
        del err
        _release_memory()
        _restore(handlers)
        return None
    record("done", done_reason(metrics), 0)
    return selection_score(metrics)


def done_reason(metrics: dict[str, Any]) -> str:
    """The reason recorded for a finished run: its steps and its selection score."""
    score = selection_score(metrics)
    return (f"trained {metrics.get('global_steps')} steps; selection score "
            f"{'none (no evaluation)' if score is None else f'{score:.4f}'}")


def _restore(handlers: dict[int, Any]) -> None:
    """Put back the signal handlers the job started with (a job that failed mid-training left its own)."""
    for number, handler in handlers.items():
        if handler is not None:
            signal.signal(number, handler)


def _release_memory() -> None:
    """Free what a failed job held before the next job of the sweep starts in this process."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _stop_sweep(exit_code: int) -> None:
    """A stop signal ended this job of a sweep run in this process: write the summary so far, say how to
    continue, and exit with the job's code (the remaining jobs do not start)."""
    from hydra.core.hydra_config import HydraConfig

    from phi3v_recipes.report import write_report
    from phi3v_recipes.sweep import rerun_command, write_summary

    sweep_dir = Path(HydraConfig.get().sweep.dir).resolve()
    write_summary(sweep_dir)
    write_report(sweep_dir, on_error="warn")  # the page must not go on showing the sweep as it was before
    print(f"stopped: the sweep stopped with this job; the jobs after it did not start. Summary so far: "
          f"{sweep_dir / 'summary.txt'}. To continue (finished jobs are kept, this one resumes from its checkpoint):"
          f"\n  {rerun_command(sweep_dir)}", file=sys.stderr, flush=True)
    sys.exit(exit_code)
