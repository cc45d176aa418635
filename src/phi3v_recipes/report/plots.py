"""The report's plots, drawn with matplotlib's Agg canvas (no display, no global pyplot state) and returned as
PNG data: URIs that the page embeds.

Each function takes plain numbers and the `plots` settings of conf/report.yaml (size, dpi, legend length).
"""

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig

Points = Sequence[tuple[int, float]]


def _figure(settings: DictConfig, taller: float = 1.0) -> tuple[Figure, Any]:
    """A figure on its own Agg canvas, and its one axis."""
    width, height = settings.width_in, settings.height_in * taller
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    # Fixed margins (in inches) rather than a layout engine, which draws every figure twice.
    figure.subplots_adjust(left=0.85 / width, right=1 - 0.2 / width, bottom=0.55 / height, top=1 - 0.35 / height)
    ax = figure.subplots()
    ax.grid(alpha=0.3)
    return figure, ax


def _steps_axis(ax: Any) -> None:
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _uri(figure: Figure, settings: DictConfig) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=settings.dpi)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _mark_resumes(ax: Any, resumes: Sequence[int]) -> None:
    """A dashed line between the last step of one launch and the first of the next."""
    for i, step in enumerate(resumes):
        ax.axvline(step + 0.5, color="tab:gray", linestyle="--", linewidth=1, label="resumed" if i == 0 else None)


def curve(points: Points, title: str, ylabel: str, settings: DictConfig, resumes: Sequence[int] = (),
          stop: int | None = None, log_scale: bool = False) -> str:
    """One per-step curve (loss, learning rate, gradient norm) with the steps where a launch resumed marked, and
    the step where early stopping ended the run."""
    figure, ax = _figure(settings)
    steps, values = zip(*points, strict=True)
    ax.plot(steps, values, marker="." if len(points) <= 50 else None, linewidth=1.2)
    _mark_resumes(ax, resumes)
    if stop is not None:
        ax.axvline(stop, color="tab:red", linestyle=":", linewidth=1.2, label="early stop")
    if log_scale and all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.set(title=title, ylabel=ylabel)
    _steps_axis(ax)
    if resumes or stop is not None:
        ax.legend(loc="best", fontsize="small")
    return _uri(figure, settings)


def evaluations(evals: Sequence[dict[str, Any]], best: dict[str, Any] | None, metric: str,
                before: float | None, settings: DictConfig, resumes: Sequence[int] = ()) -> str:
    """The held-out score at each evaluation during training, the best one starred, the untrained model's score
    as a dashed line."""
    figure, ax = _figure(settings)
    ax.plot([e["step"] for e in evals], [e["score"] for e in evals], marker="o", linewidth=1.2, label=metric)
    if before is not None:
        ax.axhline(before, color="tab:gray", linestyle=":", linewidth=1, label="before training")
    if best is not None:
        ax.plot([best["step"]], [best["score"]], marker="*", markersize=16, color="tab:orange", linestyle="none",
                label=f"best: {best['score']:.4f} at step {best['step']}")
    _mark_resumes(ax, resumes)
    ax.set(title=f"held-out {metric} during training", ylabel=metric)
    _steps_axis(ax)
    ax.legend(loc="best", fontsize="small")
    return _uri(figure, settings)


def _numbers(values: Sequence[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def metric_against(parameter: str, values: Sequence[str], scores: Sequence[float | None], jobs: Sequence[int],
                   metric: str, settings: DictConfig) -> str:
    """The sweep's metric against one swept parameter, each point labelled with its job number: a numeric axis
    (log scale when the values span a decade or more) for numbers, one position per value otherwise. Jobs
    without a score are left out."""
    figure, ax = _figure(settings)
    kept = [(v, s, j) for v, s, j in zip(values, scores, jobs, strict=True) if s is not None]
    numeric = _numbers([v for v, _, _ in kept])
    if numeric is not None and kept:
        xs = numeric
        positive = [x for x in numeric if x > 0]
        if len(positive) == len(numeric) and max(positive) / min(positive) >= 10:
            ax.set_xscale("log")
    else:
        order = sorted({v for v, _, _ in kept})
        xs = [order.index(v) for v, _, _ in kept]
        ax.set_xticks(range(len(order)), order, rotation=30 if order and max(map(len, order)) > 8 else 0)
    ax.scatter(xs, [s for _, s, _ in kept], s=36)
    for x, (_, s, j) in zip(xs, kept, strict=True):
        ax.annotate(f"job {j}", (x, s), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    ax.set(title=f"{metric} against {parameter}", xlabel=parameter, ylabel=metric)
    return _uri(figure, settings)


def overlaid_losses(curves: Sequence[tuple[str, Points]], settings: DictConfig) -> str:
    """Every job's training loss on one axis; the first `plots.max_legend` jobs are named in the legend."""
    figure, ax = _figure(settings, taller=1.4)
    for i, (label, points) in enumerate(curves):
        steps, losses = zip(*points, strict=True)
        ax.plot(steps, losses, linewidth=1.1, marker="." if len(points) <= 50 else None,
                label=label if i < settings.max_legend else None)
    ax.set(title="training loss of each job", ylabel="loss")
    _steps_axis(ax)
    ax.legend(loc="best", fontsize="x-small")
    return _uri(figure, settings)


def trial_history(scores: Sequence[float | None], metric: str, maximize: bool, settings: DictConfig) -> str:
    """An Optuna study's trials in order: each trial's objective, failed ones marked at the bottom, and the best
    value so far."""
    figure, ax = _figure(settings)
    done = [(i, s) for i, s in enumerate(scores) if s is not None and math.isfinite(s)]
    failed = [i for i, s in enumerate(scores) if s is None or not math.isfinite(s)]
    if done:
        ax.scatter([i for i, _ in done], [s for _, s in done], s=30, label="trial")
        best, running = [], None
        for i, s in done:
            running = s if running is None else (max if maximize else min)(running, s)
            best.append((i, running))
        ax.step([i for i, _ in best], [b for _, b in best], where="post", color="tab:orange", label="best so far")
    if failed:
        low = min((s for _, s in done), default=0.0)
        ax.scatter(failed, [low] * len(failed), marker="x", color="tab:red", s=40, label="failed")
    ax.set(title="trial history", xlabel="trial", ylabel=metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="best", fontsize="small")
    return _uri(figure, settings)
