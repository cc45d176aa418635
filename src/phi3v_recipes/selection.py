"""Evaluation during training: when to evaluate, which evaluation is the best, when to stop (conf/train.yaml `eval.`).

- `eval.every_steps: N` evaluates the held-out set every N optimizer steps and at the last step of the schedule.
  Each evaluation writes a checkpoint at its step, so the weights that scored are on disk.
- The best evaluation is the highest score, the earliest step among equal scores (every task metric is
  higher-is-better). `eval.keep_best` makes it the run's final model and keeps its checkpoint through rotation.
- `eval.patience: K` ends training after K evaluations in a row without a higher score than the best so far.
- The run's selection score (`selection_score` in metrics.json, what sweeps and Optuna rank runs by) is the score of
  the model the run saved, nothing else: `selection_score` below.

The scores are part of the run's exact record: every checkpoint carries the list of evaluations so far
(`recipe_state.json`, see `trainer.py`), so a resumed run continues the same history and never evaluates a step
that is already recorded. Whether a run stopped early is derived from that history and `eval.patience`, never
stored apart from it.
"""

from dataclasses import dataclass, field
from typing import Any

PREDICTIONS = "eval_step-{step}_predictions.jsonl"
"""Predictions of the evaluation at one step (id, prediction, references, score per held-out sample)."""


def predictions_name(step: int) -> str:
    return PREDICTIONS.format(step=step)


@dataclass
class Evaluations:
    """The evaluation schedule of one run and the scores recorded so far, in step order."""

    every_steps: int | None = None
    patience: int | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)  # [{"step": int, "score": float}, ...]

    @property
    def enabled(self) -> bool:
        return self.every_steps is not None

    def due(self, step: int, max_steps: int) -> bool:
        """True when `step` is an evaluation step (a multiple of every_steps, or the schedule's last step) that has
        no recorded score yet."""
        if not self.enabled or step <= 0 or self.recorded(step):
            return False
        return step % self.every_steps == 0 or step >= max_steps

    def recorded(self, step: int) -> bool:
        return any(e["step"] == step for e in self.evals)

    def add(self, step: int, score: float) -> None:
        if self.evals and step <= self.evals[-1]["step"]:
            raise ValueError(f"evaluation at step {step} after one at step {self.evals[-1]['step']}")
        self.evals.append({"step": int(step), "score": float(score)})

    @property
    def best(self) -> dict[str, Any] | None:
        """The highest score, the earliest step among equal scores; None before the first evaluation."""
        best = None
        for entry in self.evals:
            if best is None or entry["score"] > best["score"]:
                best = entry
        return dict(best) if best is not None else None

    @property
    def without_improvement(self) -> int:
        """Evaluations after the best one (none of them scored higher)."""
        best = self.best
        return 0 if best is None else sum(1 for e in self.evals if e["step"] > best["step"])

    @property
    def patience_exhausted(self) -> bool:
        return self.patience is not None and self.without_improvement >= self.patience

    def early_stop(self, step: int, max_steps: int) -> dict[str, int] | None:
        """What metrics.json records when training at `step` of `max_steps` ends because patience ran out: the
        step and the count of evaluations without improvement; None when the run is not stopped early."""
        if self.patience_exhausted and self.evals and self.evals[-1]["step"] == step and step < max_steps:
            return {"step": step, "evaluations_without_improvement": self.without_improvement}
        return None


def selection_score(evals: list[dict[str, Any]], model_step: int, eval_after: float | None) -> float | None:
    """metrics.json's `selection_score`: the held-out score of the final model, the weights of step `model_step`.

    That is the evaluation during training at `model_step` when there is one: `best.score` under eval.keep_best
    (the best evaluation's weights are the final model), the last evaluation under eval.keep_best=false (it falls
    on the final step: the schedule's last step, or the one where patience stopped the run). Otherwise it is
    `eval_after`, measured on the saved model, or None when the run did not evaluate its final model. It is never
    the score of weights the run did not keep: with eval.keep_best=false the best evaluation may be an earlier step,
    whose weights are not the final model, so crediting it would rank a run by a model it does not hold."""
    at_model = [e["score"] for e in evals if e["step"] == model_step]
    return at_model[-1] if at_model else eval_after
