"""Evaluation during training (eval.every_steps, eval.keep_best, eval.patience) through `python -m phi3v_recipes`:
the best checkpoint becomes the final model and survives rotation, patience ends a run early, and a run stopped by
SIGTERM between two evaluations ends, relaunched, with the uninterrupted run's record.

The runs continue from the README demo's trained model (the session's `default_demo`) in small steps without
warm-up, which shake it: the scores move (0.75, 0.25, 0.375 on this stack) and the best evaluation is an early
step, not the last one."""

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from phi3v_recipes.selection import Evaluations
from tests.conftest import read_metrics, run_cli
from tests.test_preemption import logged, run, start, wait_for
from tests.test_refusals import error_line
from tests.test_run_dir import untouched

EVERY, PATIENCE, MAX_STEPS = 2, 2, 24
# 48 samples in steps of 8 (6 per epoch); an evaluation every 2 steps on 8 held-out samples; rotation keeps 1.
RUN = ("task.train_size=48", "task.eval_size=8", "train.global_batch_size=8", f"train.max_steps={MAX_STEPS}",
       "train.logging_steps=1", "train.save_steps=100", "train.save_total_limit=1", "optim.lr=3e-3",
       "optim.warmup_steps=0", "eval.before=false", f"eval.every_steps={EVERY}", f"eval.patience={PATIENCE}")


def command(base: Path, run_dir: Path) -> list[str]:
    return [*RUN, f"model.name_or_path={base}", f"run.output_dir={run_dir}"]


def recipe_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "recipe_state.json").read_text())


def test_the_schedule_the_best_and_patience():
    """Evaluations fall on multiples of every_steps and on the last step, never twice on one step; the best is the
    highest score and the earliest step among equal ones; patience counts the evaluations after the best, and a
    stop at the last step of the schedule is not an early stop."""
    evaluations = Evaluations(every_steps=3, patience=2)
    assert [s for s in range(11) if evaluations.due(s, max_steps=10)] == [3, 6, 9, 10]
    assert evaluations.best is None and evaluations.early_stop(3, 10) is None
    for step, score in [(3, 0.5), (6, 0.75), (9, 0.75)]:
        evaluations.add(step, score)
    assert not evaluations.due(6, 10) and evaluations.due(12, 20)
    assert evaluations.best == {"step": 6, "score": 0.75} and evaluations.without_improvement == 1
    assert evaluations.early_stop(9, 20) is None
    evaluations.add(12, 0.25)
    assert evaluations.early_stop(12, 20) == {"step": 12, "evaluations_without_improvement": 2}
    assert evaluations.early_stop(12, 12) is None
    with pytest.raises(ValueError):
        evaluations.add(12, 1.0)
    assert not Evaluations().due(10, 10)


def test_evaluating_during_training_without_held_out_samples_is_one_sentence(tmp_path):
    """eval.every_steps with a task that has no held-out samples stops at start-up with exit code 2 and one
    sentence naming both settings, before a model is built."""
    out = run_cli(["task.train_size=16", "task.eval_size=0", "eval.every_steps=2", f"run.output_dir={tmp_path / 'r'}"],
                  cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: eval.every_steps=2 evaluates the held-out set, but task=demo has no usable held-out "
                      "samples; give the task a held-out set or set eval.every_steps=null."], out.stderr[-2000:]
    assert not (tmp_path / "r" / "tiny_base").exists() and not any((tmp_path / "r").glob("checkpoint-*"))


@pytest.fixture(scope="module")
def selected(default_demo, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One uninterrupted run with evaluations, patience and keep_best, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("selected")
    out = run(command(default_demo[1], root / "run"), root)
    assert out.returncode == 0, out.stderr[-3000:]
    return out, root / "run"


def test_the_best_evaluation_is_the_final_model_and_its_checkpoint_survives_rotation(selected, tmp_path):
    """Evaluations every N steps are recorded in step order, each with its predictions; `best` is the highest score
    (earliest on ties), the final model holds exactly that checkpoint's weights (train.save_total_limit=1 kept the
    best checkpoint beside the newest), eval_after and a separate `python -m phi3v_recipes.evaluate` of the run
    directory reproduce best.score, and the summary names the best step."""
    out, run_dir = selected
    metrics = read_metrics(run_dir)
    evals, best = metrics["evals"], metrics["best"]
    assert [e["step"] for e in evals] == list(range(EVERY, EVERY * len(evals) + 1, EVERY))
    top = max(e["score"] for e in evals)
    assert best == next(e for e in evals if e["score"] == top)
    assert best["step"] < evals[-1]["step"] and best["score"] > 0, evals
    assert metrics["selection_score"] == best["score"] and metrics["model_step"] == best["step"]
    assert metrics["eval_after"] == pytest.approx(best["score"], abs=1e-12)
    for entry in evals:
        rows = [json.loads(line) for line in (run_dir / f"eval_step-{entry['step']}_predictions.jsonl").open()]
        assert len(rows) == 8 and {"id", "prediction", "references", "score"} <= rows[0].keys()
        assert sum(r["score"] for r in rows) / len(rows) == pytest.approx(entry["score"], abs=1e-12)
    kept = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    assert kept == sorted({f"checkpoint-{best['step']}", f"checkpoint-{metrics['global_steps']}"}), kept
    final, chosen = load_file(run_dir / "model.safetensors"), load_file(run_dir / f"checkpoint-{best['step']}" /
                                                                          "model.safetensors")
    assert final.keys() == chosen.keys() and all((final[k] == chosen[k]).all() for k in final)
    assert f"best accuracy {best['score']:.3f} at step {best['step']} of {len(evals)} evaluations" in out.stdout

    again = run_cli(["hardware=cpu", "task.train_size=48", "task.eval_size=8", "eval.batch_size=32",
                     f"model.name_or_path={run_dir}", f"run.output_dir={tmp_path / 'eval'}"], cwd=tmp_path,
                    module="phi3v_recipes.evaluate")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())["score"] == pytest.approx(
        best["score"], abs=1e-12)


def test_patience_ends_the_run_early_and_records_it(selected):
    """eval.patience=K ends training, normally (exit 0, final model, metrics), at the K-th evaluation in a row
    without a higher score than the best; metrics.json `early_stop` and train.log say so, and the per-step record
    (loss, learning rate, gradient norm) covers exactly the steps trained."""
    out, run_dir = selected
    metrics = read_metrics(run_dir)
    stop, best = metrics["early_stop"], metrics["best"]
    assert stop == {"step": best["step"] + PATIENCE * EVERY, "evaluations_without_improvement": PATIENCE}
    assert metrics["global_steps"] == stop["step"] < MAX_STEPS and metrics["evals"][-1]["step"] == stop["step"]
    assert f"stopped early at step {stop['step']}" in out.stdout
    assert (f"early stop at step {stop['step']}: {PATIENCE} evaluations without improvement"
            in (run_dir / "train.log").read_text())
    steps = metrics["steps"]
    assert [s["step"] for s in steps] == list(range(1, stop["step"] + 1))
    assert all(s["learning_rate"] > 0 and s["grad_norm"] > 0 and s["loss"] > 0 for s in steps)
    assert [s["loss"] for s in steps] == recipe_state(run_dir / f"checkpoint-{stop['step']}")["step_losses"]
    assert [launch["start_step"] for launch in metrics["launches"]] == [0]
    assert metrics["train_samples_per_second"] > 0 and metrics["wall_time_s"] >= metrics["train_runtime_s"] > 0


def test_sigterm_between_two_evaluations_then_the_same_command_ends_with_the_same_record(selected, default_demo,
                                                                                          tmp_path):
    """SIGTERM after the first evaluation, before the next: the run saves and exits 143 with the evaluations so far
    in its checkpoint; the same command then ends with the uninterrupted run's `evals`, `best`, `early_stop`, final
    model step and per-step losses, evaluates no step twice (train.log, appended by both launches, names each
    evaluation once), and `launches` records both starts. A signal that lands on an evaluation step saves without
    evaluating; the relaunch evaluates those weights before it trains on."""
    _, reference = selected
    expected = read_metrics(reference)
    run_dir = tmp_path / "run"
    cmd = command(default_demo[1], run_dir)
    proc = start(cmd, tmp_path)
    wait_for(lambda: logged(run_dir, f"evaluation at step {EVERY}:"), proc)
    wait_for(lambda: logged(run_dir, f"step {EVERY + 1}/{MAX_STEPS}: loss"), proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    saved = int(stderr.split("stopped by SIGTERM at step ")[1].split(":")[0])
    assert EVERY < saved <= 2 * EVERY
    assert recipe_state(run_dir / f"checkpoint-{saved}")["evals"] == [e for e in expected["evals"] if e["step"] < saved]

    again = run(cmd, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = read_metrics(run_dir)
    for key in ("evals", "best", "early_stop", "model_step", "global_steps"):
        assert metrics[key] == expected[key], key
    assert [s["loss"] for s in metrics["steps"]] == pytest.approx([s["loss"] for s in expected["steps"]], abs=1e-6)
    log = (run_dir / "train.log").read_text()
    assert [log.count(f"evaluation at step {e['step']}:") for e in metrics["evals"]] == [1] * len(metrics["evals"])
    assert [launch["start_step"] for launch in metrics["launches"]] == [0, saved]
    assert metrics["train_samples_per_second"] > 0


def test_without_keep_best_the_selection_score_is_the_final_models_and_keep_best_cannot_be_turned_on_later(
        selected, default_demo, tmp_path):
    """eval.keep_best=false: the final model is the last step's weights, so `selection_score` (what sweeps and Optuna
    rank runs by) is the last evaluation's score, at the final step, equal to eval_after; it used to be the best
    evaluation's, an earlier step whose weights the run did not keep (rotation removed its checkpoint). A later
    launch that extends the run with eval.keep_best=true is refused with one sentence (exit 2), touching nothing:
    it used to finish with metrics.json claiming the best step as `model_step`, while transformers logged "Could not
    locate the best model" and the final model held the last step's weights."""
    run_dir = tmp_path / "run"
    out = run([*command(default_demo[1], run_dir), "eval.keep_best=false"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = read_metrics(run_dir)
    evals, best, last = metrics["evals"], metrics["best"], metrics["evals"][-1]
    assert best["step"] < last["step"] and best["score"] > last["score"], evals  # the case that tells them apart
    assert metrics["model_step"] == metrics["global_steps"] == last["step"]
    assert metrics["selection_score"] == last["score"]
    assert metrics["eval_after"] == pytest.approx(last["score"], abs=1e-12)
    assert not (run_dir / f"checkpoint-{best['step']}").exists()  # rotated away: not the final model

    before = untouched(run_dir)
    again = run([*command(default_demo[1], run_dir), "eval.keep_best=true", f"train.max_steps={MAX_STEPS + 6}",
                 f"eval.patience={PATIENCE + 2}"], tmp_path)
    assert error_line(again) == (
        "error: this run directory was trained with other settings; resuming would mix two runs (eval.keep_best: "
        "False -> True). Resume with the original values, or start a new run in another run.output_dir.")
    assert untouched(run_dir) == before


def test_a_best_checkpoint_that_is_gone_is_said_and_the_final_model_recorded_as_it_is(selected, default_demo,
                                                                                     tmp_path):
    """Rotation keeps the best checkpoint under keep_best, but a run can still lose it (deleted by hand, or a resume
    from an older checkpoint whose history's best was rotated away). A launch that ends such a run (here: a longer
    train.max_steps on a run that patience had ended: it trains nothing more) says so in train.log, keeps the last
    step's weights and records them: `model_step` is the last step and `selection_score` its score. It used to
    claim the best step in metrics.json while transformers logged "Could not locate the best model" and loaded
    nothing."""
    run_dir = tmp_path / "run"
    shutil.copytree(selected[1], run_dir)
    earlier = read_metrics(run_dir)
    best, last = earlier["best"], earlier["evals"][-1]
    assert best["step"] < last["step"] == earlier["global_steps"]
    gone = run_dir / f"checkpoint-{best['step']}"
    shutil.rmtree(gone)
    log_before = (run_dir / "train.log").read_text()

    out = run([*command(default_demo[1], run_dir), f"train.max_steps={MAX_STEPS + 6}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    log = (run_dir / "train.log").read_text()[len(log_before):]
    assert (f"eval.keep_best: the best evaluation (accuracy = {best['score']:.4f} at step {best['step']}) has no "
            f"checkpoint any more ({gone} is gone); the final model is the last "
            f"step's weights (step {last['step']})") in log
    assert "Could not locate the best model" not in log
    metrics = read_metrics(run_dir)
    assert metrics["evals"] == earlier["evals"] and metrics["best"] == best  # the record is kept as it was
    assert metrics["model_step"] == metrics["global_steps"] == last["step"]
    assert metrics["selection_score"] == last["score"]
    assert metrics["eval_after"] == pytest.approx(last["score"], abs=1e-12)
    assert f"final model: step {last['step']}" in out.stdout
    final, kept = load_file(run_dir / "model.safetensors"), load_file(run_dir / f"checkpoint-{last['step']}" /
                                                                       "model.safetensors")
    assert final.keys() == kept.keys() and all((final[k] == kept[k]).all() for k in final)


def test_a_resume_never_compares_scores_of_another_held_out_set(selected, default_demo, tmp_path):
    """The best evaluation is chosen among the scores of every launch, so a resume that would score another
    held-out subset (eval.max_samples) or generate answers of another length (eval.max_new_tokens) is refused with
    one sentence naming each key, old -> new (exit 2), and the run directory is untouched. It used to train on,
    evaluating 4 samples and comparing those scores with the earlier launch's 8-sample ones."""
    run_dir = tmp_path / "run"
    shutil.copytree(selected[1], run_dir)
    before = untouched(run_dir)
    out = run([*command(default_demo[1], run_dir), f"train.max_steps={MAX_STEPS + 6}", f"eval.patience={PATIENCE + 2}",
               "eval.max_samples=4", "eval.max_new_tokens=2"], tmp_path)
    assert error_line(out) == (
        "error: this run directory was trained with other settings; resuming would mix two runs (eval.max_new_tokens: "
        "4 -> 2; eval.max_samples: None -> 4). Resume with the original values, or start a new run in another "
        "run.output_dir.")
    assert untouched(run_dir) == before

