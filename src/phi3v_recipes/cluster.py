"""Which launch and which rank this process is: the run stamp of a launch, and Slurm through the Hydra submitit
launcher, where each Slurm task is one rank of a DDP/DeepSpeed job.

    python -m phi3v_recipes -m hydra/launcher=slurm task=nlvr2 strategy=full hardware=a100 \
        hydra.launcher.partition=<partition>

Inside a job that submitit started with several tasks, `export_distributed_env` sets the variables
torch.distributed reads (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) from the job
itself (`submitit.helpers.TorchDistributedEnvironment`: Slurm's task ids and node list, or the local executor's),
before the Trainer joins the process group. Elsewhere (a plain run, torchrun) it does nothing.

`SubmissionSetup` fixes the launch stamp of the run directories at submission: the launching process exports
PHI3V_RUN_STAMP, which every task inherits and Slurm keeps for a requeued job, so that all tasks and every
requeue resolve `${phi3v_stamp:}` alike (the sweep directory itself also travels resolved in the job's pickle:
Hydra copies the launching config's resolver cache into each job's). A job's run directory,
<hydra.sweep.dir>/<job number>, is thus the same for all its tasks and attempts, and `train.resume=auto` finds
its checkpoints there.
"""

import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

_exported = False
sweep_dir: Path | None = None  # the sweep's directory, in the process that runs a multirun (`-m`)


def in_submitit_job() -> bool:
    """True in a process that submitit started as a job task (Slurm or local executor)."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR")) and "SUBMITIT_FOLDER" in os.environ


def export_distributed_env() -> None:
    """In a submitit job of more than one task, export this task's rank and the job's rendezvous (once per
    process; the job's values replace any inherited from the submitting shell). A no-op anywhere else.

    CUDA_VISIBLE_DEVICES is left alone: every task of a node sees the node's GPUs and takes cuda:LOCAL_RANK."""
    global _exported
    if _exported or not in_submitit_job():
        return
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    _exported = True


_stamp: str | None = None


def run_stamp() -> str:
    """A timestamp naming the run directory, identical on every rank of one torchrun launch.

    Ranks start at slightly different times, so under torchrun the stamp is the start time of the launcher
    (the parent process all local ranks share); PHI3V_RUN_STAMP overrides it (a multirun exports it for the jobs
    it submits: cluster.SubmissionSetup). Across several nodes nothing else is shared: `config.validate` then asks for an
    explicit run.output_dir. One process always gets the same stamp.
    """
    global _stamp
    if stamp := os.environ.get("PHI3V_RUN_STAMP"):
        return stamp
    if _stamp is not None:
        return _stamp
    started = time.time()
    if "LOCAL_RANK" in os.environ:
        try:
            import psutil

            started = psutil.Process(os.getppid()).create_time()
        except Exception:  # noqa: BLE001 - fall back to now; validate() still guards multi-node runs
            pass
    _stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started))
    return _stamp


class SubmissionSetup(Callback):
    """Hydra callback (conf/train.yaml), run before a multirun launches its jobs: exports the run stamp its
    directories are named with, so that jobs started in other processes (submitit tasks, requeued jobs) inherit
    it instead of taking their own start time; with hydra/launcher=slurm, stops with one sentence where there is
    no Slurm to submit to."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global sweep_dir
        os.environ["PHI3V_RUN_STAMP"] = run_stamp()
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        launcher = str(config.hydra.launcher.get("_target_", ""))
        if launcher.endswith(".SlurmLauncher") and not (shutil.which("sbatch") and shutil.which("srun")):
            print("error: hydra/launcher=slurm submits with sbatch and srun, which are not on PATH here; submit "
                  "from a Slurm login node, or run on this machine with hydra/launcher=slurm_local.",
                  file=sys.stderr, flush=True)
            sys.exit(2)


def rank() -> int:
    export_distributed_env()  # a task of a multi-task submitit job learns its rank before Hydra names its logs
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    export_distributed_env()
    return int(os.environ.get("WORLD_SIZE", 1))


def single_process_rendezvous() -> None:
    """Give a run started as one plain process (no torchrun, no multi-task submitit job) a process group of its
    own on a free local port, for the libraries that join one even alone (DeepSpeed). Left to themselves they
    look for an MPI launcher (an ImportError without mpi4py; with it, port 29500 for every run), so a second such
    run on the same machine (a sweep's jobs on other GPUs, tests side by side) failed with EADDRINUSE. Launched
    processes keep their launcher's rendezvous; a MASTER_PORT set by the user is kept."""
    export_distributed_env()
    if "WORLD_SIZE" in os.environ:
        return
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:  # a port free now; the store binds it a moment later
            probe.bind(("", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")


def launch_overrides() -> list[str]:
    """The command-line overrides of this job (in a sweep or a Slurm job too, where the process's own command line
    is the launcher's)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def explicit_output_dir() -> bool:
    """True when the user chose run.output_dir (the default embeds the launch stamp)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.get()
    except ValueError:
        return True
    return any(o.split("=", 1)[0].lstrip("+") == "run.output_dir" for o in launch_overrides())


def resume_command(run_dir: Path) -> str:
    """How to continue the run in `run_dir`: the same command, plus the directory when its name held a launch time
    that a new launch would not reproduce."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        fixed = HydraConfig.get().mode == RunMode.MULTIRUN or explicit_output_dir()
    except ValueError:
        fixed = True
    if fixed or "PHI3V_RUN_STAMP" in os.environ:
        return "run the same command"
    return f"run the same command with run.output_dir={run_dir}"


def output_dir(cfg: DictConfig) -> Path:
    """The run directory: run.output_dir, or in a sweep the job's own directory."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return Path(hydra_cfg.runtime.output_dir)
    except ValueError:
        pass
    return Path(cfg.run.output_dir)
