"""Slurm through the Hydra submitit launcher (conf/hydra/launcher/slurm.yaml, slurm_local.yaml): each task of a
job is one rank of one DDP job, all tasks and every requeue share one run directory, the timeout signal saves and
requeues, and the batch script carries the settings the docs promise."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from phi3v_recipes.cli import register_resolvers
from phi3v_recipes.config import validate
from phi3v_recipes.errors import ConfigError
from tests.conftest import offline_env, read_metrics

# 32 samples, global batch 16 = 2 ranks x 8, a checkpoint every 2 steps, no evaluation.
TWO_RANK_DEMO = ("task.train_size=32", "train.max_steps=12", "train.save_steps=2", "train.logging_steps=1",
                 "eval.before=false", "eval.after=false")


def submitit_tasks(pid: int) -> list[psutil.Process]:
    """The task processes of the submitit jobs started under process `pid` (the local executor's workers)."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "submitit.core._submit" in " ".join(child.cmdline()):
                found.append(child)
    return found


@pytest.mark.slow
def test_local_two_task_job_is_one_ddp_run_that_saves_and_requeues_on_the_timeout_signal(tmp_path):
    """`-m hydra/launcher=slurm_local` runs the job as 2 submitit tasks that join one gloo DDP job (each task saves
    its own rank's RNG state, rank 1 logs to train.rank1.log) in the one run directory the launching process named
    (the default, timestamped sweep directory). SIGUSR2 to both tasks mid-run (what Slurm sends `signal_delay_s`
    before the time limit): the ranks finish their step and save it, submitit requeues the job, and the requeued
    tasks find the same directory, resume from that checkpoint, finish all steps and write metrics.json."""
    cmd = [sys.executable, "-m", "phi3v_recipes", "-m", "hydra/launcher=slurm_local", *TWO_RANK_DEMO]
    output = tmp_path / "output.txt"
    with output.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=offline_env(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob("multirun/demo/*/0/checkpoint-*")):
            assert proc.poll() is None and time.monotonic() < deadline, output.read_text()[-3000:]
            time.sleep(0.05)
        tasks = submitit_tasks(proc.pid)
        assert len(tasks) == 2
        for task in tasks:
            task.send_signal(signal.SIGUSR2)
        assert proc.wait(timeout=300) == 0, output.read_text()[-3000:]

    (sweep,) = (tmp_path / "multirun" / "demo").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [".submitit", "0"]
    run_dir = sweep / "0"
    metrics = read_metrics(run_dir)
    assert metrics["global_steps"] == 12 and metrics["output_dir"] == str(run_dir)
    assert (run_dir / "train.rank1.log").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoint-12").glob("rng_state*")) == ["rng_state_0.pth",
                                                                                    "rng_state_1.pth"]
    log = (run_dir / "train.log").read_text()
    stopped = re.search(r"stopped by SIGUSR2 at step (\d+)", log)
    assert stopped and 2 <= int(stopped.group(1)) < 12, log[-3000:]
    assert f"resuming from {run_dir / f'checkpoint-{stopped.group(1)}'}" in log
    (job,) = (p for p in (sweep / ".submitit").iterdir() if p.name != "%j")
    assert "Requeued job" in "".join(p.read_text() for p in job.glob(f"{job.name}_0_log.*"))
    assert sorted(p.name for p in job.glob("*_result.pkl")) == [f"{job.name}_0_result.pkl",
                                                                 f"{job.name}_1_result.pkl"]


def test_slurm_batch_script_asks_for_one_task_per_gpu_and_the_timeout_signal(tmp_path):
    """`-m hydra/launcher=slurm` writes an sbatch script with one task per GPU, the time limit, and SIGUSR2
    `signal_delay_s` before it. (`sbatch` here is a stand-in that records the script and refuses the job.) Without
    Slurm, the command stops with one sentence."""
    bin_dir, record = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    for tool, script in {"sbatch": f'cp "$1" {record}\necho "sbatch: no Slurm here" >&2\nexit 1',
                         "srun": "exit 1"}.items():
        (bin_dir / tool).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / tool).chmod(0o755)
    env = offline_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cmd = [sys.executable, "-m", "phi3v_recipes", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
           "hydra.launcher.nodes=2", "task=nlvr2", "strategy=full", "hardware=a100"]
    subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    script = record.read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, flags=re.M))
    assert {k: flags.get(k) for k in ("nodes", "gpus-per-node", "ntasks-per-node", "partition", "time",
                                      "signal", "cpus-per-task", "mem")} == {
        "nodes": "2", "gpus-per-node": "8", "ntasks-per-node": "8", "partition": "gpu", "time": "1440",
        "signal": "USR2@300", "cpus-per-task": "8", "mem": "256GB"}
    assert "srun --unbuffered" in script

    no_slurm = subprocess.run(cmd, cwd=tmp_path, env=offline_env(PATH=os.path.dirname(sys.executable)),
                              capture_output=True, text=True, timeout=300)
    assert no_slurm.returncode == 2 and no_slurm.stderr.startswith("error: hydra/launcher=slurm submits with sbatch"), \
        no_slurm.stderr[-2000:]
    assert len(no_slurm.stderr.strip().splitlines()) == 1, no_slurm.stderr


def test_a_multi_node_submitit_job_needs_no_explicit_run_directory(monkeypatch):
    """Over several nodes, torchrun ranks must be given run.output_dir (each node would take its own stamp), but
    the tasks of a submitit job get their directory resolved from the submission: start-up accepts them."""
    register_resolvers()
    with initialize_config_module(config_module="phi3v_recipes.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["train.batch_size=1"], return_hydra_config=True)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)  # restored afterwards
    HydraConfig.instance().set_config(cfg)  # as in a launched job: run.output_dir not given
    with open_dict(cfg):
        del cfg["hydra"]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="several nodes"):
        validate(cfg, world=4)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SUBMITIT_FOLDER", "/cluster/sweep/.submitit/42")
    validate(cfg, world=4)
