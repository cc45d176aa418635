"""The report pages: a run or a sweep, read (`run_dir`, `sweep_dir`), plotted (`plots`) and rendered through the
Jinja2 templates beside this module into one HTML string with everything embedded."""

from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from omegaconf import DictConfig, OmegaConf

from phi3v_recipes.report import plots
from phi3v_recipes.report.gallery import build_gallery
from phi3v_recipes.report.run_dir import RunRecord
from phi3v_recipes.report.sweep_dir import SweepRecord

# The figures of a run's summary table, in order: metrics.json key -> label.
RUN_FIGURES = {
    "eval_before": "held-out {metric} before training",
    "eval_after": "held-out {metric} after training",
    "selection_score": "selection score (compared across runs)",
    "train_loss": "mean training loss over all steps",
    "global_steps": "optimizer steps",
    "train_samples": "training samples",
    "eval_samples": "held-out samples",
    "skipped_samples": "skipped samples",
    "train_samples_per_second": "training samples per second",
    "wall_time_s": "wall time of the last launch (s)",
}


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("phi3v_recipes.report", "templates"),
                      autoescape=select_autoescape(default=True), trim_blocks=True, lstrip_blocks=True)
    env.filters["number"] = number
    return env


def number(value: Any) -> str:
    """How a figure is shown: floats with 4 decimals (6 significant digits when smaller than 0.001), integers as
    they are, a dash for a missing one."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}" if value != 0 and abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)


def run_page(run: RunRecord, settings: DictConfig) -> str:
    """The HTML of a run's report."""
    metrics, plot = run.metrics, settings.plots
    metric = metrics.get("metric") or "score"
    figures = [(key, label.format(metric=metric), metrics[key]) for key, label in RUN_FIGURES.items()
               if metrics.get(key) is not None]
    stop = (metrics.get("early_stop") or {}).get("step")
    images = {}
    if run.losses:
        images["loss"] = plots.curve(run.losses, "training loss", "loss", plot, run.resumes, stop)
    if run.learning_rates:
        images["learning_rate"] = plots.curve(run.learning_rates, "learning rate", "learning rate", plot,
                                              run.resumes, stop)
    if run.grad_norms:
        images["grad_norm"] = plots.curve(run.grad_norms, "gradient norm (before clipping)", "norm", plot,
                                          run.resumes, stop, log_scale=True)
    if run.evals:
        images["evals"] = plots.evaluations(run.evals, metrics.get("best"), metric, metrics.get("eval_before"),
                                            plot, run.resumes)
    config = run.config
    return _environment().get_template("run.html.j2").render(
        run=run,
        every_steps=OmegaConf.select(config, "eval.every_steps") if config is not None else None,
        metric=metric,
        figures=figures,
        best=metrics.get("best"),
        early_stop=metrics.get("early_stop"),
        images=images,
        gallery=build_gallery(run.run_dir, config, settings),
        skipped=run.skipped[: settings.skipped.max_listed],
        log_tail=run.log_tail(settings.log.max_lines) if run.state != "done" else [],
    )


def sweep_page(sweep: SweepRecord, settings: DictConfig) -> str:
    """The HTML of a sweep's (or a study's) report."""
    plot = settings.plots
    ranked = sweep.ranked()
    scores = [job.score for job in sweep.jobs]
    numbers = [job.number for job in sweep.jobs]
    against = [(key, plots.metric_against(key, [job.values.get(key, "-") for job in sweep.jobs], scores, numbers,
                                          sweep.metric, plot))
               for key in sweep.swept if any(s is not None for s in scores)]
    curves = [(" ".join(f"{k}={job.values.get(k, '-')}" for k in sweep.swept) or f"job {job.number}",
               job.run.losses) for job in sweep.jobs if job.run.losses]
    history = (plots.trial_history(scores, sweep.metric, sweep.study.maximize, plot)
               if sweep.study is not None and sweep.jobs else None)
    return _environment().get_template("sweep.html.j2").render(
        sweep=sweep,
        ranked=ranked,
        against=against,
        losses=plots.overlaid_losses(curves, plot) if curves else None,
        history=history,
    )
