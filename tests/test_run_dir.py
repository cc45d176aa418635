"""The run directory records the truth: one job at a time, a resume trains what the record says or stops, a finished
run is not trained again. Through `python -m phi3v_recipes` on the tiny demo, on CPU."""

import json
import shutil
import time

from omegaconf import OmegaConf

from phi3v_recipes.rundir import MAY_CHANGE, SAME_RUN, check_same_run
from tests.conftest import NINE_STEPS, compose_config, read_metrics, run_cli, start

RUN = ("task.train_size=48", "task.eval_size=8", "train.logging_steps=1", "optim.warmup_steps=2",
       "eval.before=false", "eval.after=false", "train.save_steps=3")


def untouched(run_dir) -> dict:
    """Every file of a run but the launch records a relaunch rewrites (.hydra/, the log, the lock)."""
    return {p: p.read_bytes() for p in run_dir.rglob("*")
            if p.is_file() and ".hydra" not in p.parts and p.name not in ("train.log", ".lock")}


def test_resume_with_other_settings_stops_naming_them_and_a_longer_run_extends(tmp_path):
    """Resuming with settings that change what is trained (optim.lr, train.seed) stops with one sentence naming each
    key and both values, touching nothing; a longer train.max_steps (allowed) continues from the last checkpoint and
    the record then says so, reusing the untrained model's score of the first launch; relaunching the finished run
    trains nothing and says so."""
    run_dir = tmp_path / "run"
    base = [*RUN, "train.max_steps=3", f"run.output_dir={run_dir}"]
    first = run_cli([*base, "eval.before=true"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = untouched(run_dir)

    changed = run_cli([*base, "optim.lr=0.5", "train.seed=7"], cwd=tmp_path)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "optim.lr: 0.003 -> 0.5" in changed.stderr and "train.seed: 42 -> 7" in changed.stderr
    assert "train.max_steps" not in changed.stderr
    assert untouched(run_dir) == before

    again = run_cli(base, cwd=tmp_path)
    assert again.returncode == 0 and "holds a finished run (metrics.json): nothing to train" in again.stdout
    assert untouched(run_dir) == before

    longer = run_cli([*RUN, "train.max_steps=5", "eval.before=true", f"run.output_dir={run_dir}"], cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert read_metrics(run_dir)["global_steps"] == 5
    assert "as measured by the first launch of this run" in (run_dir / "train.log").read_text()
    (previous,) = json.loads((run_dir / "metrics.previous.json").read_text())
    assert read_metrics(run_dir)["eval_before"] == previous["eval_before"] is not None
    assert OmegaConf.load(run_dir / "config.yaml").train.max_steps == 5
    assert (run_dir / "metrics.previous.json").is_file()
    assert "resuming with changed settings: train.max_steps: 3 -> 5" in (run_dir / "train.log").read_text()


def test_a_second_process_on_a_busy_run_directory_stops_and_a_dead_holder_is_taken_over(tmp_path):
    """While a run trains, a second launch into its directory stops at once naming the holder (pid and command) and
    changes nothing; after the holder is killed with -9, the next launch takes the stale lock over and finishes."""
    run_dir = tmp_path / "run"
    holder = start([*RUN, "train.epochs=20", f"run.output_dir={run_dir}"], tmp_path, threads=1)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "train.log").is_file() or "step 1/" not in (run_dir / "train.log").read_text():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        second = run_cli([*RUN, f"run.output_dir={run_dir}"], cwd=tmp_path)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"is in use by another run (pid {holder.pid} on " in second.stderr
        assert "train.epochs=20" in second.stderr  # the holder's command
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.communicate()
    third = run_cli([*RUN, "train.epochs=20", "train.max_steps=4", f"run.output_dir={run_dir}"], cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "took over the lock" in (run_dir / "train.log").read_text()


def test_the_keys_that_decide_the_weights_are_governed_and_the_rest_may_change():
    """check_same_run refuses a change in each group that decides the weights (model, task, strategy, optim, train,
    data, precision) and allows the documented MAY_CHANGE keys and everything outside those groups."""
    saved = compose_config("model=tiny", "hardware=cpu")
    refused = {"model.name_or_path": "other", "task.train_size": 7, "strategy.name": "lora", "optim.lr": 1.0,
               "train.global_batch_size": 32, "data.num_crops": 4, "hardware.precision": "bf16"}
    for key, value in refused.items():
        now = saved.copy()
        OmegaConf.update(now, key, value)
        try:
            check_same_run(saved, now)
        except ValueError as err:
            assert key in str(err)
        else:
            raise AssertionError(f"{key} may not change on resume")
    now = saved.copy()
    for key, value in {"train.max_steps": 99, "data.num_workers": 5, "data.screen_workers": 1, "eval.batch_size": 3,
                       "report_to": "none", "model.attn_implementation": "eager"}.items():
        OmegaConf.update(now, key, value)
    assert len(check_same_run(saved, now)) == 6
    assert all(key.startswith(SAME_RUN) for key in MAY_CHANGE)


def test_a_finished_run_relaunched_with_another_keep_best_is_refused_and_its_record_stays_true(three_steps, tmp_path):
    """A relaunch of a finished run trains nothing, so it cannot choose its final model again: changing
    eval.keep_best there is refused with one sentence (exit 2) naming the key and both values, and nothing in the
    run directory changes, config.yaml included. It used to exit 0 ("nothing to train") while config.yaml kept the
    old value: the record said one thing, the launch another."""
    run_dir = tmp_path / "run"
    shutil.copytree(three_steps, run_dir)
    before = untouched(run_dir)
    out = run_cli([*NINE_STEPS, "train.max_steps=3", "train.save_steps=3", "eval.keep_best=false",
                   f"run.output_dir={run_dir}"], cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert [line for line in out.stderr.splitlines() if line.startswith("error: ")] == [
        "error: this run directory was trained with other settings; resuming would mix two runs (eval.keep_best: "
        "True -> False). Resume with the original values, or start a new run in another run.output_dir."]
    assert untouched(run_dir) == before
    assert OmegaConf.load(run_dir / "config.yaml").eval.keep_best is True


def test_every_extension_of_a_finished_run_keeps_the_earlier_records(three_steps, tmp_path):
    """A finished run extended twice (3 steps, then 4, then 5) keeps both earlier metrics.json in
    metrics.previous.json, oldest first, each exactly as it was; the second extension used to overwrite the first
    run's record."""
    run_dir = tmp_path / "run"
    shutil.copytree(three_steps, run_dir)
    first = read_metrics(run_dir)
    base = [*NINE_STEPS, "train.save_steps=3", f"run.output_dir={run_dir}"]
    out = run_cli([*base, "train.max_steps=4"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    second = read_metrics(run_dir)
    out = run_cli([*base, "train.max_steps=5"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [m["global_steps"] for m in (first, second, read_metrics(run_dir))] == [3, 4, 5]
    assert json.loads((run_dir / "metrics.previous.json").read_text()) == [first, second]
    from phi3v_recipes.rundir import read_previous_metrics  # how code reads it (the old single record too)

    assert read_previous_metrics(run_dir) == [first, second]
    (run_dir / "metrics.previous.json").write_text(json.dumps(first))
    assert read_previous_metrics(run_dir) == [first]


def test_resuming_in_place_from_a_checkpoint_that_is_not_the_newest_is_refused(three_steps, tmp_path):
    """train.resume=<run>/checkpoint-3 while <run>/checkpoint-5 exists would grow a second history beside the first
    in one directory (rotation then keeps the old branch's newest steps, and train.resume=auto continues them): one
    sentence naming the later checkpoints and both ways out, exit 2, nothing changed. It used to train."""
    run_dir = tmp_path / "run"
    shutil.copytree(three_steps, run_dir)
    shutil.copytree(run_dir / "checkpoint-3", run_dir / "checkpoint-5")  # stands for a later step of the run
    before = untouched(run_dir)
    resume = run_dir / "checkpoint-3"
    out = run_cli([*NINE_STEPS, "train.max_steps=6", "train.save_steps=3", f"train.resume={resume}",
                   f"run.output_dir={run_dir}"], cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert [line for line in out.stderr.splitlines() if line.startswith("error: ")] == [
        f"error: train.resume={resume} is not the newest checkpoint of {run_dir}: checkpoint-5 came after it, and "
        "resuming from it there would mix two histories of the run. To go back to checkpoint-3, move checkpoint-5 "
        f"out of the run directory first; or continue from it in a new run: train.resume={resume} "
        "run.output_dir=<another directory>."]
    assert untouched(run_dir) == before


def test_a_launch_shorter_than_the_run_it_continues_is_refused(three_steps, tmp_path):
    """A launch never trains past its length nor undoes steps: relaunching a run whose checkpoint holds 3 steps with
    train.max_steps=2, or with train.epochs=0.5 (2 steps of its 3 per epoch), is refused with one sentence (exit 2)
    naming the checkpoint's steps, the length asked and what to do, and nothing in the run directory changes. Any
    change of the length used to count as an extension: a finished run went on (mid-epoch, one step past the length
    asked) and exited 0."""
    run_dir = tmp_path / "run"
    shutil.copytree(three_steps, run_dir)
    before = untouched(run_dir)
    base = [*NINE_STEPS, "train.save_steps=3", f"run.output_dir={run_dir}"]
    for length, asked in (("train.max_steps=2", "the 2 that train.max_steps=2 asks for"),
                          ("train.epochs=0.5", "the 2 that train.epochs=0.5 asks for (3 per epoch)")):
        out = run_cli([*base, length], cwd=tmp_path)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert [line for line in out.stderr.splitlines() if line.startswith("error: ")] == [
            f"error: {run_dir / 'checkpoint-3'} has already trained 3 steps, more than {asked}, and a launch never "
            "trains past its length nor undoes steps: relaunch with its run's own length (train.max_steps=3, as its "
            "config.yaml says) or longer, or start a new run in another run.output_dir."]
        assert untouched(run_dir) == before  # status.json ("done") and metrics.json included
