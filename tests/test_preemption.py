"""Runs that are interrupted (SIGTERM, SIGINT, kill -9, a failed write) and relaunched with the same command finish
exactly as an uninterrupted run; runs that diverge stop without saving a broken model. All through
`python -m phi3v_recipes` on the tiny demo, on CPU."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import NINE_STEPS, read_metrics, run_cli
from tests.conftest import start as conftest_start
from tests.launcher import Launched


def command(run_dir: Path, *extra: str) -> list[str]:
    """The arguments of `python -m phi3v_recipes` for the nine-step run in `run_dir`."""
    return [*NINE_STEPS, *extra, f"run.output_dir={run_dir}"]


def step_losses(run_dir: Path) -> list[float]:
    """The exact per-step losses recorded in the newest checkpoint."""
    newest = max(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((newest / "recipe_state.json").read_text())["step_losses"]


def start(args: list[str], cwd: Path, **options) -> Launched:
    """The command started with one thread (tests of this module run while others train)."""
    return conftest_start(args, cwd, threads=1, **options)


def run(args: list[str], cwd: Path, **options) -> subprocess.CompletedProcess:
    """The command run to its end with one thread."""
    return run_cli(args, cwd, threads=1, **options)


def wait_for(predicate, proc: Launched, timeout: float = 120, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(interval)


def logged(run_dir: Path, text: str) -> bool:
    log = run_dir / "train.log"
    return log.is_file() and text in log.read_text()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    out = run(command(root / "run"), root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "run"


@pytest.mark.parametrize(("stop", "workers"), [(signal.SIGTERM, 0), (signal.SIGINT, 2)])
def test_a_stop_signal_mid_epoch_saves_and_the_same_command_finishes_the_run(stop, workers, uninterrupted,
                                                                            tmp_path):
    """SIGTERM (preemption) or SIGINT (Ctrl-C, which also reaches the DataLoader workers) in the middle of an epoch:
    the run finishes its optimizer step, saves a checkpoint there and exits with one line (code 128 + signal, no
    traceback); the identical command then resumes and ends with the per-step losses and train_loss of a run that
    was never interrupted (to 1e-6). train.log tells the story, with no deprecation warning in either launch; the
    stop sentence is printed and logged once."""
    run_dir = tmp_path / "run"
    cmd = command(run_dir, f"data.num_workers={workers}")
    proc = start(cmd, tmp_path, new_session=True)
    wait_for(lambda: logged(run_dir, "step 4/9"), proc)
    os.killpg(proc.pid, stop) if stop == signal.SIGINT else proc.send_signal(stop)  # Ctrl-C hits the whole group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + stop, stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = [x.split("stopped: ", 1)[1] for x in stderr.splitlines() if "stopped: " in x]
    assert f"stopped by {stop.name} at step" in line and "; run the same command to resume" in line
    assert "run run" not in line and (stdout + stderr).count(f"stopped by {stop.name}") == 1  # said once
    assert (run_dir / "train.log").read_text().count(f"stopped by {stop.name}") == 1
    saved = int(line.split("at step ")[1].split(":")[0])
    assert 4 <= saved < 9 and (run_dir / f"checkpoint-{saved}").is_dir()
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "model.safetensors").exists()

    again = run(cmd, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    expected = step_losses(uninterrupted)
    assert len(expected) == 9
    assert step_losses(run_dir) == pytest.approx(expected, abs=1e-6, rel=0)
    assert read_metrics(run_dir)["train_loss"] == pytest.approx(read_metrics(uninterrupted)["train_loss"], abs=1e-6)
    assert read_metrics(run_dir)["train_loss"] == pytest.approx(sum(expected) / 9, abs=1e-9)
    log = (run_dir / "train.log").read_text()
    for text in ("command: ", "step 1/9: loss ", f"received {stop.name}", f"stopped by {stop.name}",
                 f"resuming from {run_dir / f'checkpoint-{saved}'}", "step 9/9: loss ", "== phi3v-recipes:"):
        assert text in log, text
    assert "FutureWarning" not in log and "deprecated" not in log.lower()  # the resume's reads included


def test_kill_9_while_a_checkpoint_is_written_then_the_same_command_finishes(uninterrupted, tmp_path):
    """kill -9 at the moment a checkpoint is being written: no incomplete checkpoint is ever taken for a complete
    one. The next launch of the same command reports and removes what was left half-written, resumes from the last
    complete checkpoint (or starts over) and ends with the uninterrupted run's losses."""
    run_dir = tmp_path / "run"
    cmd = command(run_dir, "train.save_steps=3")
    proc = start(cmd, tmp_path)
    staging = run_dir / ".checkpoint-staging"

    def staged() -> bool:
        """A checkpoint is being written (its staging directory has files) after one was saved."""
        try:
            return any(staging.iterdir()) and logged(run_dir, "saved")
        except FileNotFoundError:  # not made yet, or renamed away between two looks
            return False

    wait_for(staged, proc, interval=0.0002)
    proc.kill()
    proc.communicate(timeout=60)
    # Killed while checkpoint-6 was staged (almost always), or just after its rename: never a partial checkpoint-6.
    renamed = (run_dir / "checkpoint-6").exists()
    assert not renamed or (run_dir / "checkpoint-6" / "recipe_state.json").is_file()
    (run_dir / "checkpoint-9").mkdir()  # what an older, non-atomic save would leave: an empty checkpoint

    again = run(cmd, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    removed = "checkpoint-9" if renamed else "checkpoint-6, checkpoint-9"
    assert f"removed incomplete checkpoint(s) left by an interrupted run: {removed}" in log
    assert f"resuming from {run_dir / ('checkpoint-6' if renamed else 'checkpoint-3')}" in log
    assert step_losses(run_dir) == pytest.approx(step_losses(uninterrupted), abs=1e-6, rel=0)


# No file may grow past 256 KiB: a checkpoint or model write fails part-way, as on a full disk.
FULL_DISK = 256 * 1024


def test_a_failed_checkpoint_write_stops_the_run_and_keeps_the_previous_checkpoint(three_steps, tmp_path):
    """A checkpoint write that fails (here: files may not grow past 256 KiB, as on a full disk) stops the run with one
    sentence naming the checkpoint and the reason; the previous checkpoint stays complete, nothing half-written is
    left, and the same command without the limit finishes the run."""
    run_dir = tmp_path / "run"
    shutil.copytree(three_steps, run_dir)
    cmd = command(run_dir, "train.max_steps=6", "train.save_steps=3")
    full = run(cmd, tmp_path, max_file_size=FULL_DISK)
    assert full.returncode == 1, full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr[-4000:]
    assert f"error: writing checkpoint {run_dir / 'checkpoint-6'} failed (" in full.stderr
    assert "checkpoint-3 is kept" in full.stderr
    assert [p.name for p in run_dir.glob("checkpoint-*")] == ["checkpoint-3"]
    assert (run_dir / "checkpoint-3" / "trainer_state.json").is_file()
    assert not (run_dir / ".checkpoint-staging").exists()

    again = run(cmd, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(step_losses(run_dir)) == 6


def test_a_diverging_run_stops_naming_the_step_and_saves_no_broken_model(tmp_path):
    """optim.lr=1e6 makes the weights non-finite within a few steps: the run stops with one sentence naming the step
    and the non-finite loss, exits non-zero, keeps the last good checkpoint and saves no final model or metrics."""
    run_dir = tmp_path / "run"
    out = run_cli([*NINE_STEPS, "optim.lr=1e6", "optim.warmup_steps=0", "train.save_steps=1", f"run.output_dir={run_dir}"],
                  cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    (line,) = [x.split("error: ", 1)[1] for x in out.stderr.splitlines() if "error: " in x]
    assert "training diverged at step" in line and ("loss nan" in line or "loss inf" in line)
    step = int(line.split("at step ")[1].split(":")[0])
    assert f"checkpoint-{step - 1}, is kept" in line
    assert sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))[-1] == step - 1
    assert not (run_dir / "model.safetensors").exists() and not (run_dir / "metrics.json").exists()
    assert "training diverged at step" in (run_dir / "train.log").read_text()


# A run's log whose write blocks (train.log is a pipe whose reader waits), a stop signal sent to the main thread
# during that write, then the reader drains the pipe.
INTERRUPTED_WRITE = """
import logging, os, signal, sys, threading, time
from phi3v_recipes.preemption import StopSignals
fifo, out = sys.argv[1], sys.argv[2]
os.mkfifo(fifo)
drain = threading.Event()
def reader():
    with open(fifo, "rb") as pipe, open(out, "wb") as sink:
        drain.wait()
        sink.write(pipe.read())
threading.Thread(target=reader).start()
handler = logging.FileHandler(fifo)
handler.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
logging.getLogger().addHandler(handler)
logging.getLogger().setLevel(logging.INFO)
StopSignals(["SIGTERM"])
main = threading.get_ident()
def interrupt():
    time.sleep(0.5)
    signal.pthread_kill(main, signal.SIGTERM)
    time.sleep(0.3)
    drain.set()
threading.Thread(target=interrupt).start()
for i in range(100):
    logging.getLogger("demo").info("%03d %s", i, "x" * 1000)
handler.close()
"""


def test_a_stop_signal_that_interrupts_a_log_write_is_logged_whole(tmp_path):
    """A stop signal that lands while the main thread is inside a write to the run's log (the signal handler then
    runs inside that write) is logged without re-entering it: its line arrives whole between the others, and
    logging reports no error. It used to print "--- Logging error --- ... reentrant call" and lose the line (seen
    in a SIGTERM to a run logging its step)."""
    sink = tmp_path / "log"
    out = subprocess.run([sys.executable, "-c", INTERRUPTED_WRITE, str(tmp_path / "pipe"), str(sink)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Logging error" not in out.stderr, out.stderr[-3000:]
    lines = sink.read_text().splitlines()
    demo = [line.split(" ") for line in lines if line.startswith("[demo]")]
    assert [(number, len(text)) for _, _, number, text in demo] == [(f"{i:03d}", 1000) for i in range(100)]
    assert lines.count("[phi3v_recipes.preemption][WARNING] - received SIGTERM: finishing the current optimizer "
                       "step, then saving a checkpoint and stopping") == 1
    assert len(lines) == 101


def test_a_resume_at_the_last_step_trains_nothing_and_an_extension_follows_its_new_schedule(tmp_path):
    """A run of 2 steps (3 per epoch, so its last checkpoint is in the middle of an epoch) stopped after that
    checkpoint, as a stop signal during the final evaluation leaves it (checkpoint-2, no metrics.json): the same
    command trains nothing and finishes the run at 2 steps. Hugging Face's loop checks max_steps only after a step,
    and the relaunch used to train step 3/2 and record it.

    The finished run extended to 4 steps takes its first new step at the rate the 4-step linear schedule gives
    step 3 (half the peak), not at the 2-step schedule's end (0, which trained nothing: checkpoint-3's weights
    were checkpoint-2's), and step 4 at a quarter."""
    run_dir = tmp_path / "run"
    base = ["task.train_size=48", "task.eval_size=8", "train.logging_steps=1", "optim.warmup_steps=0",
            "eval.before=false", "eval.after=false", "train.save_steps=1", "train.save_total_limit=10"]
    cmd = [*base, "train.max_steps=2", f"run.output_dir={run_dir}"]
    assert run(cmd, tmp_path).returncode == 0

    stopped = tmp_path / "stopped"
    shutil.copytree(run_dir, stopped)
    (stopped / "metrics.json").unlink()
    again = run([*cmd[:-1], f"run.output_dir={stopped}"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    log = (stopped / "train.log").read_text()
    assert "resumed at step 2 of 2: nothing more to train" in log and "step 3/2" not in log
    assert read_metrics(stopped)["global_steps"] == 2 and len(read_metrics(stopped)["steps"]) == 2
    assert not (stopped / "checkpoint-3").exists()

    longer = run([*base, "train.max_steps=4", f"run.output_dir={run_dir}"], tmp_path)
    assert longer.returncode == 0, longer.stderr[-3000:]
    rates = [row["learning_rate"] for row in read_metrics(run_dir)["steps"]]
    assert rates == pytest.approx([0.003, 0.0015, 0.0015, 0.00075], rel=1e-6)
    assert (run_dir / "checkpoint-3" / "model.safetensors").read_bytes() != \
        (run_dir / "checkpoint-2" / "model.safetensors").read_bytes()
