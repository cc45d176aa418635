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

import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from phi3v_recipes.errors import ConfigError
from phi3v_recipes.files import atomic_write_text
from phi3v_recipes.report import write_report
from phi3v_recipes.rundir import RunLock, holds_run, load_record, read_metrics, setting_changes
from phi3v_recipes.status import read_status, selection_score

COLUMNS = ("selection_score", "eval_before", "eval_after", "train_loss", "train_samples_per_second", "wall_time_s")
STUDY_SWEEPER = "hydra_plugins.phi3v_optuna_sweeper.optuna_sweeper.OptunaSweeper"
SWEEP_RECORD = "multirun.yaml"  # the sweep's composed configuration, written by the sweeper as it starts


def jobs(sweep_dir: Path) -> list[tuple[int, Path]]:
    """(job number, job directory) of every job in a sweep, in job order: the numbered subdirectories of the
    default layout (`hydra.sweep.subdir=${hydra.job.num}`), and any other directory under it where Hydra recorded
    a job (`.hydra/hydra.yaml`, with its number), wherever another `hydra.sweep.subdir` put it."""
    found = {d: int(d.name) for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()}
    for record in sweep_dir.glob("**/.hydra/hydra.yaml"):
        job = record.parent.parent
        if job not in found and (number := _job_number(record)) is not None:
            found[job] = number
    nested = {parent for job in found for parent in job.parents}  # `${hydra.job.num}/...`: the job is below
    return sorted(((n, d) for d, n in found.items() if d not in nested), key=lambda job: (job[0], str(job[1])))


def _job_number(hydra_record: Path) -> int | None:
    try:
        number = (yaml.safe_load(hydra_record.read_text(encoding="utf-8")) or {})["hydra"]["job"]["num"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return number if isinstance(number, int) else None


def job_row(job: Path, number: int) -> dict[str, Any]:
    """One job's row: its number, overrides, status and reason, and the metrics of its finished run
    (none unless its status is done: a job refused in a later launch of the sweep still holds the metrics of what
    it trained before, which do not belong to its current overrides)."""
    overrides_file = job / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    metrics = read_metrics(job)
    status = read_status(job)
    if status is None:
        status = ({"status": "done", "reason": "finished (recorded before status.json existed)"} if metrics else
                  {"status": "failed", "reason": "the job ended without recording how (killed?); see its train.log"})
    if status["status"] != "done":
        metrics = {}
    row = {"job": number, "overrides": overrides, "status": status["status"], "reason": status["reason"],
           "metric": metrics.get("metric")}
    row.update({k: metrics.get(k) for k in COLUMNS})
    row["selection_score"] = selection_score(metrics) if metrics else None
    return row


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory, the highest selection score first (then job order; jobs without a score last)."""
    rows = [{**job_row(job, number), "dir": job.relative_to(sweep_dir).as_posix()} for number, job in jobs(sweep_dir)]
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

    def job(row: dict[str, Any]) -> str:  # the job's directory too, when hydra.sweep.subdir is not its number
        return str(row["job"]) if row.get("dir", str(row["job"])) == str(row["job"]) else f"{row['job']} ({row['dir']})"

    table = [header] + [[job(row) if k == "job" else cell(k, row[k]) for k in header] for row in rows]
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


def given_overrides(cfg: DictConfig, kind: str = "task") -> list[str]:
    """The command line's overrides of `kind` (task or hydra) as typed: a `${...}` in one stays as it is (a saved
    multirun.yaml would resolve it when read)."""
    return list(OmegaConf.to_container(cfg.hydra.overrides, resolve=False)[kind])


def swept(cfg: DictConfig) -> list[tuple[str, str]]:
    """The sweep's swept overrides, on the command line in its order, then in hydra.sweeper.params, as (override as
    given, its canonical form: what Hydra parses, so `choice(1e-3, 2e-3)` and `choice(1e-3,2e-3)` are one)."""
    params = OmegaConf.to_container(cfg.hydra.sweeper, resolve=False).get("params") or {}
    found = []
    for line in [*given_overrides(cfg), *(f"hydra.sweeper.params.{k}={v}" for k, v in params.items())]:
        (override,) = OverridesParser.create().parse_overrides([line.removeprefix("hydra.sweeper.params.")])
        if override.is_sweep_override():
            value = override.value()
            if isinstance(value, ChoiceSweep):  # a,b is choice(a,b)
                value = dataclasses.replace(value, simple_form=False)
            found.append((line, f"{override.get_key_element()}={value!r}"))
    return found


def job_list(cfg: DictConfig) -> list[tuple[str, str]]:
    """What decides a sweep's jobs and their directories, as (override as given, canonical form): the sweeper (and
    a study's direction), the swept overrides (their order numbers the jobs) and hydra.sweep.subdir."""
    hydra = cfg.hydra
    sweeper = OmegaConf.to_container(hydra.sweeper, resolve=False)
    fixed = [f"hydra/sweeper={hydra.runtime.choices.get('hydra/sweeper')}",
             *([f"hydra.sweeper.direction={sweeper['direction']}"] if "direction" in sweeper else [])]
    subdir = f"hydra.sweep.subdir={OmegaConf.to_container(hydra.sweep, resolve=False).get('subdir')}"
    return [(line, line) for line in fixed] + swept(cfg) + [(subdir, subdir)]


def shared_overrides(cfg: DictConfig) -> list[str]:
    """The command-line overrides every job of the sweep gets as they are (those not swept), sorted."""
    lines = {line for line, _ in swept(cfg)}
    return sorted(o for o in given_overrides(cfg) if o not in lines)


def check_subdir(cfg: DictConfig, continuing: bool) -> None:
    """ConfigError for a hydra.sweep.subdir that cannot hold one job per directory, or (`continuing` a sweep in its
    directory) that would not give each job the directory it had: a constant one (every job in one directory),
    one with the launch time in it (`${now:...}`: new directories at every launch), or one named by the overrides
    (`${hydra.job.override_dirname}`) when the overrides every job shares changed (checked by the caller)."""
    subdir = str(OmegaConf.to_container(cfg.hydra.sweep, resolve=False).get("subdir"))
    if swept(cfg) and "${" not in subdir:
        raise ConfigError(f"hydra.sweep.subdir={subdir} puts every job of this sweep in one directory; name it by "
                          "the job, e.g. hydra.sweep.subdir=${hydra.job.num} (the default).")
    if continuing and "${now:" in subdir:
        raise ConfigError(f"hydra.sweep.subdir={subdir} holds the launch time, so this launch would give every "
                          "job a new directory instead of continuing the sweep already in hydra.sweep.dir; give "
                          "this launch another hydra.sweep.dir (a sweep named by time cannot be continued).")


def check_same_sweep(sweep_dir: Path, now: DictConfig) -> None:
    """A sweep directory holds one sweep, as a run directory holds one run. Before a sweep starts in a directory
    where an earlier one made jobs (its multirun.yaml and job directories), ConfigError when the two differ in
    their jobs (`job_list`: the job directories would pass to other jobs, and the summary or the study would mix
    them), or, once a job has trained something, in a setting a resumed run must keep (`rundir.SAME_RUN`,
    compared as written, before interpolation). The same command, or one that changes only what a resume may
    change (say, train.epochs for every job), continues it. A directory whose earlier sweep made no job (refused
    at start-up, a typo in a group option) is free for any sweep."""
    path = sweep_dir / SWEEP_RECORD
    made = jobs(sweep_dir)
    check_subdir(now, continuing=path.is_file() and bool(made))
    if not path.is_file() or not made:
        return
    saved = load_record(path)
    before, after = job_list(saved), job_list(now)
    if [canon for _, canon in before] != [canon for _, canon in after]:
        gone = [line for line, canon in before if canon not in {c for _, c in after}]
        new = [line for line, canon in after if canon not in {c for _, c in before}]
        diff = (f"it swept {' '.join(gone) or 'nothing else'}; this one sweeps {' '.join(new) or 'nothing'}"
                if gone or new else "the same values in another order, which numbers the jobs differently")
        mixed = ("its study would mix two searches" if str(now.hydra.sweeper.get("_target_")) == STUDY_SWEEPER else
                 "its job directories would pass to other jobs")
        raise ConfigError(f"hydra.sweep.dir={sweep_dir} holds another sweep ({diff}); {mixed}. Give this sweep "
                          "another hydra.sweep.dir, or continue that one with its own command: "
                          f"{sweep_command(saved, sweep_dir)}")
    if "override_dirname" in str(OmegaConf.to_container(now.hydra.sweep, resolve=False).get("subdir")):
        shared_before, shared_now = shared_overrides(saved), shared_overrides(now)
        if shared_before != shared_now:
            gone = " ".join(o for o in shared_before if o not in shared_now)
            added = " ".join(o for o in shared_now if o not in shared_before)
            change = " and ".join([*([f"drops {gone}"] if gone else []), *([f"adds {added}"] if added else [])])
            raise ConfigError(f"hydra.sweep.subdir names each job's directory by its overrides, and this launch "
                              f"{change}, so every job would start again in a new directory; continue the sweep "
                              "with its "
                              f"own command ({sweep_command(saved, sweep_dir)}), or give this one another "
                              "hydra.sweep.dir.")
    if not any(holds_run(job) for _, job in made):
        return  # nothing trained yet (every job failed at start-up, say): any settings may be tried again
    forbidden, _ = setting_changes(saved, now, resolve=False)
    if forbidden:
        raise ConfigError(f"hydra.sweep.dir={sweep_dir} holds a sweep trained with other settings; re-running it "
                          f"there would mix two sweeps ({'; '.join(forbidden)}). Give this sweep another "
                          f"hydra.sweep.dir, or continue that one with its own command: "
                          f"{sweep_command(saved, sweep_dir)}")


def sweep_command(cfg: DictConfig, sweep_dir: Path) -> str:
    """The command line of the sweep `cfg` describes (its multirun.yaml), pinned to `sweep_dir`."""
    given = [*given_overrides(cfg, "hydra"), *given_overrides(cfg)]
    args = [a for a in given if not a.lstrip("+").startswith(("hydra.sweep.dir=", "hydra.mode="))]
    return shlex.join(["python", "-m", "phi3v_recipes", "-m", *args, f"hydra.sweep.dir={sweep_dir}"])


def rerun_command(sweep_dir: Path) -> str:
    """The command of this sweep, pinned to `sweep_dir` (hydra.sweep.dir) so that it continues there."""
    args = [a for a in sys.argv[1:] if not a.lstrip("+").startswith("hydra.sweep.dir=")]
    return shlex.join(["python", "-m", "phi3v_recipes", *args, f"hydra.sweep.dir={sweep_dir}"])


class SweepSummary(Callback):
    """Hydra callback: the summary of every sweep, and its exit code (see the module docstring)."""

    lock: RunLock | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Lock the sweep directory for this sweep (a second sweep there is refused at once, not job by job) and
        check that it holds no other sweep (`check_same_sweep`); either mistake: one sentence, exit 2."""
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        try:
            if not sweep_dir.is_dir():
                check_subdir(config, continuing=False)  # before the directory is made: a refusal leaves nothing
            sweep_dir.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock(sweep_dir, setting="hydra.sweep.dir")
            self.lock.acquire()
            check_same_sweep(sweep_dir, config)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._summarise(config)
        finally:
            if self.lock is not None:
                self.lock.release()

    def _summarise(self, config: DictConfig) -> None:
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
            results = sweep_dir / "optimization_results.yaml"
            best = f"the best finished trial in {results}" if results.is_file() else "no trial finished"
            print(f"error: {len(unfinished)} of {len(rows)} trials failed (jobs "
                  f"{', '.join(str(r['job']) for r in unfinished)}); the study recorded them as failed trials and "
                  f"went on; reasons in {sweep_dir / 'summary.txt'}, {best}. To continue the study in the same "
                  "directory "
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
