"""An Optuna study as a Hydra sweeper: Optuna proposes each trial's parameters, Hydra's launcher runs the trials
(one after another with the basic launcher, in parallel with hydra/launcher=slurm), and each trial's selection
score goes back to Optuna through the ask-and-tell API.

    python -m phi3v_recipes -m hydra/sweeper=optuna hydra.sweeper.n_trials=20 hydra.sweeper.n_jobs=4 \
        'optim.lr=tag(log, interval(1e-5, 1e-3))' 'train.epochs=range(1, 4)' 'strategy.lora.rank=choice(8, 16, 32)'

The search space uses the command-line syntax of Hydra's own Optuna sweeper (hydra-optuna-sweeper, which still
pins optuna<3): `interval(a, b)` is a float distribution, `tag(log, ...)` makes it log-scaled and
`tag(int, ...)` integer-valued, `range(a, b[, step])` takes the values Hydra's range gives (b excluded) as an ordered
distribution, and `choice(...)` or `a,b,c` a categorical one. Other overrides are passed to every trial as they
are. `hydra.sweeper.params` holds a search space in the config, in the same syntax (the command line wins).

The objective is the trial's selection score (status.json and metrics.json in its job directory:
`phi3v_recipes.status`). A trial that failed (status failed: divergence, a bad value, out of memory, ...) is told
to Optuna as FAIL and the study goes on. The study lives in the sweep directory (`optuna_study.db`, SQLite, study
name `phi3v`): the same command with the same `hydra.sweep.dir` continues it, until it holds `n_trials` trials
(failed ones included). A trial that a stop signal ended stays "running" in the study; the next launch runs it
again in its own job directory, where `train.resume=auto` continues from its checkpoint. Job numbers are trial
numbers: job directory `<sweep dir>/<trial number>`.

At the end `optimization_results.yaml` in the sweep directory names the best trial (`best_params`, `best_value`).
"""

import logging
import math
import re
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

STORAGE_FILE = "optuna_study.db"
STUDY_NAME = "phi3v"
RESULTS_FILE = "optimization_results.yaml"
DIRECTIONS = ("maximize", "minimize")

log = logging.getLogger(__name__)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def distribution(override: Override) -> Any:
    """The Optuna distribution of one sweep override (interval, tag(log|int, interval), range, choice)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value, key = override.value(), override.get_key_element()
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if "int" in value.tags:  # Hydra parses interval bounds as floats
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    values = list(override.sweep_iterator())
    if not values:
        _fail(f"{override.input_line}: this search space holds no value.")
    if isinstance(value, RangeSweep) and not value.shuffle:
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
    if isinstance(value, (ChoiceSweep, RangeSweep)):
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
            _fail(f"{override.input_line}: Optuna chooses among numbers, strings, booleans and null only; give "
                  f"{key} such values.")
        return CategoricalDistribution(values)
    _fail(f"{override.input_line}: hydra/sweeper=optuna searches interval(...), tag(log, interval(...)), "
          "range(...) and choice(...) (or a,b,c).")


def search_space(params: dict[str, str], arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
    """({override key: distribution}, fixed overrides) of hydra.sweeper.params and the command line (which wins
    over params for the same key)."""
    parser, lines = OverridesParser.create(), {}
    for line in [f"{k}={v}" for k, v in params.items()] + list(arguments):
        (override,) = parser.parse_overrides([line])
        lines[override.get_key_element()] = override
    space, fixed = {}, []
    for key, override in lines.items():
        if override.is_sweep_override():
            space[key] = distribution(override)  # the key keeps its + or ++
        else:
            fixed.append(override.input_line)
    return space, fixed


def encode(value: Any) -> str:
    """`value` as an override value Hydra parses back to it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value).lower()
    if isinstance(value, str) and not re.fullmatch(r"[\w./:-]+", value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def consecutive(numbers: list[int], size: int) -> list[list[int]]:
    """`numbers` (sorted) in groups of at most `size` consecutive numbers: one launch each, job number = trial
    number."""
    groups: list[list[int]] = []
    for number in numbers:
        if groups and groups[-1][-1] == number - 1 and len(groups[-1]) < size:
            groups[-1].append(number)
        else:
            groups.append([number])
    return groups


class OptunaSweeper(Sweeper):
    """`hydra/sweeper=optuna` (conf/hydra/sweeper/optuna.yaml documents every key)."""

    def __init__(self, direction: str, n_trials: int, n_jobs: int, sampler: Any = None,
                 params: dict[str, str] | None = None):
        self.direction, self.n_trials, self.n_jobs = direction, n_trials, n_jobs
        self.sampler_cfg, self.params = sampler, dict(params or {})
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        try:
            import optuna  # noqa: F401
        except ImportError:
            _fail("hydra/sweeper=optuna needs Optuna, which is not installed here: pip install "
                  "'phi3v-recipes[optuna]'.")
        if self.direction not in DIRECTIONS:
            _fail(f"hydra.sweeper.direction={self.direction}: choose maximize or minimize.")
        if not (isinstance(self.n_trials, int) and self.n_trials > 0 and isinstance(self.n_jobs, int)
                and self.n_jobs > 0):
            _fail(f"hydra.sweeper.n_trials={self.n_trials} and hydra.sweeper.n_jobs={self.n_jobs}: both must be "
                  "whole numbers > 0.")
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        import optuna
        from optuna.trial import TrialState

        assert self.config is not None
        space, fixed = search_space(self.params, arguments)
        if not space:
            _fail("hydra/sweeper=optuna has nothing to search: give at least one setting a search space, e.g. "
                  "'optim.lr=tag(log, interval(1e-4, 1e-2))'.")
        searched = {key.lstrip("+~") for key in space}
        evaluation = self.config.get("eval") or {}
        if not (evaluation.get("after") or evaluation.get("every_steps")) and not searched & {"eval.after",
                                                                                              "eval.every_steps"}:
            _fail("hydra/sweeper=optuna optimizes each trial's selection score, which needs an evaluation: "
                  "eval.after=true or eval.every_steps=N.")
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(storage=f"sqlite:///{sweep_dir / STORAGE_FILE}", study_name=STUDY_NAME,
                                    direction=self.direction, load_if_exists=True)
        if study.direction.name.lower() != self.direction:
            _fail(f"the study in {sweep_dir / STORAGE_FILE} was made to {study.direction.name.lower()}, not "
                  f"{self.direction} (hydra.sweeper.direction): keep its direction or choose another "
                  "hydra.sweep.dir.")
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # once the study is this one's: a refused launch
        study.sampler = self._sampler(len(study.trials))          # leaves the directory's record alone
        log.info("Optuna study %s in %s: %d of %d trials recorded; search space: %s", STUDY_NAME,
                 sweep_dir / STORAGE_FILE, len(study.trials), self.n_trials, ", ".join(space))

        # Trials an earlier launch left running (it was stopped): run them again in their own job directories.
        left = {t.number: t.params for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        if left:
            log.info("continuing trial(s) %s, left unfinished by an earlier launch", ", ".join(map(str, left)))
        groups = [[(n, left[n]) for n in group] for group in consecutive(sorted(left), self.n_jobs)]
        while True:
            if not groups:
                if len(study.trials) >= self.n_trials:
                    break
                asked = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - len(study.trials)))]
                groups = [[(t.number, t.params) for t in asked]]
            if not self._run(study, groups.pop(0), fixed):
                break
        self._write_results(study, sweep_dir)

    def _sampler(self, seen: int) -> Any:
        """hydra.sweeper.sampler; a seeded sampler gets its seed plus the number of trials already in the study,
        so that a continued study does not propose the same points again."""
        if self.sampler_cfg is None:
            return None
        if OmegaConf.select(self.sampler_cfg, "seed") is not None:
            return instantiate(self.sampler_cfg, seed=int(self.sampler_cfg.seed) + seen)
        return instantiate(self.sampler_cfg)

    def _run(self, study: Any, trials: list[tuple[int, dict[str, Any]]], fixed: list[str]) -> bool:
        """Launch `trials` (consecutive numbers) as jobs of those numbers and tell Optuna their outcomes; False
        when one of them was stopped (the study then stops here, to be continued)."""
        from optuna.trial import TrialState

        assert self.config is not None and self.hydra_context is not None
        launchable = []
        for number, params in trials:
            overrides = [*fixed, *(f"{key}={encode(value)}" for key, value in params.items())]
            try:  # a composition error (say, an unknown config group option) fails this trial only
                self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            except Exception as err:  # noqa: BLE001 - Hydra raises several kinds
                log.warning("trial %d failed before launch: %s", number, err)
                study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
                self._record_unlaunched(number, overrides, err)
                continue
            launchable.append((number, overrides))
        finished = True
        for group in consecutive([n for n, _ in launchable], len(launchable) or 1):
            batch = [o for n, o in launchable if n in group]
            returns = self.launcher.launch(batch, initial_job_idx=group[0])
            for number, ret in zip(group, returns, strict=True):
                finished &= self._tell(study, number, ret)
        return finished

    def _record_unlaunched(self, number: int, overrides: list[str], err: Exception) -> None:
        """A trial whose configuration could not be composed has no job directory of Hydra's: make one, as a job
        that failed at start-up leaves it (its overrides and status.json), so that the summary lists the trial and
        the command's exit code counts it."""
        from phi3v_recipes.errors import reason
        from phi3v_recipes.status import write_status

        assert self.config is not None
        job_dir = Path(str(self.config.hydra.sweep.dir)).resolve() / str(number)
        (job_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(overrides), job_dir / ".hydra" / "overrides.yaml")
        write_status(job_dir, "failed", f"its configuration could not be composed: {reason(err)}", 2)

    def _tell(self, study: Any, number: int, ret: JobReturn) -> bool:
        from optuna.trial import TrialState

        from phi3v_recipes.status import read_status
        from phi3v_recipes.sweep import job_row

        assert self.config is not None
        job_dir = Path(str(ret.hydra_cfg.hydra.runtime.output_dir)) if ret.hydra_cfg is not None else \
            Path(str(self.config.hydra.sweep.dir)) / str(number)
        status = read_status(job_dir) or {"status": "failed", "reason": "no status.json"}
        if ret.status == JobStatus.FAILED:
            status = {"status": "failed", "reason": repr(ret._return_value)}
        if status["status"] == "stopped":
            log.warning("trial %d was stopped (%s): the same command continues it", number, status["reason"])
            return False
        score = job_row(job_dir, number)["selection_score"] if status["status"] == "done" else None
        if status["status"] == "done" and score is None:
            status = {"status": "failed", "reason": "the run has no selection score: evaluate it (eval.after=true "
                      "or eval.every_steps)"}
        if score is None:
            log.warning("trial %d failed: %s", number, status["reason"])
            study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        else:
            study.tell(number, score, skip_if_finished=True)
        return True

    def _write_results(self, study: Any, sweep_dir: Path) -> None:
        from optuna.trial import TrialState

        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            log.warning("no trial of the study finished; %s is not written", sweep_dir / RESULTS_FILE)
            return
        from phi3v_recipes.sweep import jobs

        best = study.best_trial
        best_dir = next((d for n, d in jobs(sweep_dir) if n == best.number), sweep_dir / str(best.number))
        results = {"name": "optuna", "best_params": dict(best.params), "best_value": best.value,
                   "best_trial": best.number, "best_job_dir": str(best_dir),
                   "trials": {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,)))
                              for state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING)}}
        OmegaConf.save(OmegaConf.create(results), sweep_dir / RESULTS_FILE)
        log.info("best trial %d: selection score %s with %s (%s)", best.number, best.value, best.params,
                 sweep_dir / RESULTS_FILE)
