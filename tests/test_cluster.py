"""Slurm through the Hydra submitit launcher (conf/hydra/launcher/slurm.yaml, slurm_local.yaml): each task of a
job is one rank of one DDP job, all tasks share one run directory, and the batch script carries the settings the
docs promise."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import offline_env, read_metrics, run_cli

# A 2-step run: 32 samples, global batch 16 = 2 ranks x 8; no evaluation.
TWO_RANK_DEMO = ("task.train_size=32", "train.epochs=1", "train.logging_steps=1", "eval.before=false",
                 "eval.after=false")


@pytest.mark.slow
def test_local_submitit_job_runs_two_tasks_as_ranks_of_one_ddp_job(tmp_path):
    """`-m hydra/launcher=slurm_local` runs the job as 2 submitit tasks that join one gloo DDP job (each task
    saves its own rank's RNG state, rank 1 logs to train.rank1.log) in the one run directory the launching process
    named (the default, timestamped sweep directory: the tasks inherit its stamp), and writes metrics.json."""
    out = run_cli(["-m", "hydra/launcher=slurm_local", *TWO_RANK_DEMO], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun" / "demo").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [".submitit", "0"]
    run_dir = sweep / "0"
    metrics = read_metrics(run_dir)
    assert metrics["global_steps"] == 2 and metrics["output_dir"] == str(run_dir)
    assert (run_dir / "train.log").is_file() and (run_dir / "train.rank1.log").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoint-2").glob("rng_state*")) == ["rng_state_0.pth",
                                                                                   "rng_state_1.pth"]
    (job,) = (p for p in (sweep / ".submitit").iterdir() if p.name != "%j")
    assert sorted(p.name for p in job.glob("*_result.pkl")) == [f"{job.name}_0_result.pkl",
                                                                 f"{job.name}_1_result.pkl"]


def test_slurm_batch_script_asks_for_one_task_per_gpu_and_the_timeout_signal(tmp_path):
    """`-m hydra/launcher=slurm` writes an sbatch script with one task per GPU, the time limit, SIGUSR2
    `signal_delay_s` before it. (`sbatch` here is a stand-in that records the script and refuses the job.) Without Slurm, the
    command stops with one sentence."""
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
