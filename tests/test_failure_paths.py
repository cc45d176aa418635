"""Failure paths of a training run, through `python -m phi3v_recipes` on the tiny demo: resuming another run's
checkpoint, a final model that cannot be written, a second Ctrl-C. Each ends in one sentence, the right exit code,
and nothing lost or half-written."""

import os
import shutil
import signal

from tests.conftest import read_metrics, run_parallel
from tests.test_preemption import FULL_DISK, command, logged, run, start, wait_for


def test_resuming_another_runs_checkpoint_is_checked_like_a_resume_in_place(three_steps, tmp_path):
    """train.resume=<a checkpoint of another run> is checked against that run's config.yaml: changed settings are
    refused naming each key (exit 2); a full checkpoint under strategy=lora is refused in one sentence (not a
    transformers ValueError) even when copied away from its run; the same settings resume it and finish."""
    checkpoint = three_steps / "checkpoint-3"
    loose = tmp_path / "copied" / "checkpoint-3"  # a checkpoint copied away from its run: no config.yaml
    shutil.copytree(checkpoint, loose)
    commands = {
        "drift": ["phi3v_recipes", *command(tmp_path / "drift", "train.max_steps=4", "optim.lr=1e-3",
                                           f"train.resume={checkpoint}")],
        "lora": ["phi3v_recipes", *command(tmp_path / "lora", "train.max_steps=4", "strategy=lora",
                                          f"train.resume={loose}")],
        "same": ["phi3v_recipes", *command(tmp_path / "same", "train.max_steps=4", "train.save_steps=3",
                                          f"train.resume={checkpoint}")],
    }
    results = run_parallel(commands, cwd=tmp_path)
    for name in ("drift", "lora"):
        out = results[name]
        assert out.returncode == 2 and "Traceback" not in out.stderr, (name, out.stderr[-3000:])
        (line,) = [x for x in out.stderr.splitlines() if x.startswith("error: ")]
        if name == "drift":
            assert line.startswith(f"error: train.resume={checkpoint} was trained with other settings; resuming "
                                   "would mix two runs (optim.lr: 0.003 -> 0.001)"), line
        else:
            assert line == (f"error: train.resume={loose} holds full model weights, no LoRA adapter, but "
                            "strategy=lora trains one; resume it with the strategy that wrote it, or start this run "
                            "fresh (train.resume=auto in a new run.output_dir)."), line
        assert not list((tmp_path / name).glob("checkpoint-*"))
    same = results["same"]
    assert same.returncode == 0, same.stderr[-3000:]
    assert logged(tmp_path / "same", f"resuming from {checkpoint}")
    assert read_metrics(tmp_path / "same")["global_steps"] == 4


def test_a_failed_final_model_write_names_the_last_good_checkpoint(tmp_path):
    """The final model is written like a checkpoint: when the write fails (files may not grow past 256 KiB, as on
    a full disk) the run stops with one sentence naming the last good checkpoint, also in train.log; the staged
    files are removed, so the run directory never holds a config.json without weights; the same command without
    the limit then finishes the run."""
    run_dir = tmp_path / "run"
    cmd = command(run_dir, "train.max_steps=3", "train.save_steps=3", "eval.after=true", "task.eval_size=24")
    first = start(cmd, tmp_path)
    wait_for(lambda: logged(run_dir, f"saved {run_dir / 'checkpoint-3'}"), first)
    first.kill()  # kill -9 after the last checkpoint, before the run finished (no metrics.json)
    first.communicate()
    assert not (run_dir / "metrics.json").exists()

    full = run(cmd, tmp_path, max_file_size=FULL_DISK)
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-4000:]
    (line,) = [x for x in full.stderr.splitlines() if x.startswith("error: ")]
    assert line.startswith(f"error: writing the final model to {run_dir} failed (") and "checkpoint-3 is kept" in line
    assert line.split("error: ", 1)[1] in (run_dir / "train.log").read_text()
    assert (run_dir / "config.json").exists() == (run_dir / "model.safetensors").exists()
    assert not (run_dir / ".checkpoint-staging").exists() and not (run_dir / "metrics.json").exists()

    again = run(cmd, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "config.json").is_file() and (run_dir / "model.safetensors").is_file()
    assert read_metrics(run_dir)["global_steps"] == 3


def test_a_second_ctrl_c_names_the_checkpoint_that_was_kept(tmp_path):
    """Ctrl-C asks the run to finish its step and save; a second Ctrl-C before that save stops at once (exit
    130) with one sentence naming the newest checkpoint that was kept, not "nothing is saved"."""
    run_dir = tmp_path / "run"
    proc = start(command(run_dir, "train.max_steps=60", "train.save_steps=2"), tmp_path)
    wait_for(lambda: logged(run_dir, f"saved {run_dir / 'checkpoint-2'}") and logged(run_dir, "step 3/60"), proc)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: logged(run_dir, "received SIGINT"), proc, interval=0.005)  # signals are not queued: one at a time
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    lines = [x.split("stopped: ", 1)[1] for x in stderr.splitlines() if "stopped: " in x]  # after a progress bar
    assert len(lines) == 1, stderr[-3000:]
    line = "stopped: " + lines[0]
    newest = max(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert line.startswith("stopped: interrupted by a second Ctrl-C at step "), line
    assert line.endswith(f"before its checkpoint was written: {newest} is the newest checkpoint kept; run the same "
                         "command to resume from it."), line
    assert "nothing is saved" not in stderr
    assert not os.path.exists(run_dir / "metrics.json")


def test_train_log_is_free_of_deprecation_warnings_from_our_calls(three_steps):
    """train.log collects library warnings; the recipe's own calls (activation checkpointing, rope settings) use
    the current transformers APIs, so a run logs no deprecation warning."""
    log = (three_steps / "train.log").read_text()
    assert "FutureWarning" not in log and "deprecated" not in log.lower(), log[-3000:]
