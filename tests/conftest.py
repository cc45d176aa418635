"""Shared helpers: running the public entrypoint in a subprocess, offline, composing configs, and training runs
that many tests read once per session.

`make test` runs the suite on every core with pytest-xdist (`-n auto`, one test module per worker): each worker
and the processes its tests start then use their share of the cores (`pytest_configure`), and a run shared by
tests of several modules is trained by the first worker that needs it while the others wait (`shared_run`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock
from hydra import compose, initialize_config_module

from phi3v_recipes.cli import register_resolvers

ROOT = Path(__file__).resolve().parents[1]

# A short demo run: enough steps for the loss to fall, small enough for CI.
SMALL_DEMO = (
    "task.train_size=48",
    "task.eval_size=8",
    "train.epochs=2",
    "train.logging_steps=1",
    "train.save_steps=4",
    "optim.warmup_steps=2",
    "eval.batch_size=8",
)

# 48 samples, global batch 16 of 8 x 2 accumulation: 3 optimizer steps per epoch, 9 in all (the runs that are
# interrupted and relaunched: test_preemption.py, test_failure_paths.py).
NINE_STEPS = ("task.train_size=48", "task.eval_size=8", "train.epochs=3", "train.logging_steps=1",
              "train.save_steps=100", "optim.warmup_steps=2", "eval.before=false", "eval.after=false")


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, each worker (and every process its tests start) uses cores / workers threads: PyTorch's
    default of one thread per core in every worker would oversubscribe the machine and spin."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        os.environ.setdefault("MKL_NUM_THREADS", threads)


def offline_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    return env


def run_cli(args: list[str], cwd: Path, module: str = "phi3v_recipes", torchrun_procs: int = 0,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m <module> args` (or under torchrun), in `cwd`, offline; output captured as text."""
    if torchrun_procs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_procs}",
               "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=cwd, env=offline_env(), capture_output=True, text=True, timeout=timeout)


def run_parallel(commands: dict[str, list[str]], cwd: Path, timeout: int = 600,
                 pass_fds: tuple[int, ...] = ()) -> dict[str, subprocess.CompletedProcess]:
    """Each `python -m <argv>` (module first) started at once in `cwd`, offline with one thread each; waits for
    all. Output goes to `<name>.stdout` / `<name>.stderr` in `cwd` and comes back as text. `pass_fds` stay open
    in every process (e.g. a pipe a command reads as /proc/self/fd/N)."""
    env = offline_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    started = {}
    for name, args in commands.items():
        cmd = [sys.executable, "-m", *args]
        logs = (cwd / f"{name}.stdout").open("w"), (cwd / f"{name}.stderr").open("w")
        started[name] = (cmd, logs, subprocess.Popen(cmd, cwd=cwd, env=env, stdout=logs[0], stderr=logs[1],
                                                     pass_fds=pass_fds))
    results = {}
    for name, (cmd, logs, proc) in started.items():
        proc.wait(timeout=timeout)
        for log in logs:
            log.close()
        stdout, stderr = ((cwd / f"{name}.{stream}").read_text() for stream in ("stdout", "stderr"))
        results[name] = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    return results


def official_preprocessor_config(num_img_tokens: int = 144) -> dict:
    """The Phi-3.5-vision hub repo's `preprocessor_config.json` (remote-code `auto_map`, `processor_class`), with
    `num_img_tokens` as given (144 in the real file)."""
    return {
        "auto_map": {
            "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
            "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
        },
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "Phi3VImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "num_crops": 4,
        "num_img_tokens": num_img_tokens,
        "processor_class": "Phi3VProcessor",
    }


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def compose_config(*overrides: str):
    register_resolvers()
    with initialize_config_module(config_module="phi3v_recipes.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def shared_run(tmp_path_factory: pytest.TempPathFactory, name: str,
               args: list[str]) -> tuple[subprocess.CompletedProcess, Path]:
    """`python -m phi3v_recipes args run.output_dir=<dir>` once per test session, for the tests of every module that
    read it: the first xdist worker to ask trains it under a file lock in the session's shared temporary directory
    (the parent of the workers' own), and the others wait for it and read its recorded output. Tests must not
    change the run."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent
    home, record = root / f"shared-{name}", root / f"shared-{name}.json"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not record.is_file():
            home.mkdir()
            out = run_cli([*args, f"run.output_dir={home / 'run'}"], cwd=home)
            record.write_text(json.dumps({"args": out.args, "returncode": out.returncode, "stdout": out.stdout,
                                          "stderr": out.stderr}))
    out = subprocess.CompletedProcess(**json.loads(record.read_text()))
    assert out.returncode == 0, out.stderr[-3000:]
    return out, home / "run"


@pytest.fixture(scope="session")
def default_demo(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """README's main job, run once per session: `python -m phi3v_recipes` with no task options."""
    return shared_run(tmp_path_factory, "default_demo", [])


@pytest.fixture(scope="session")
def three_steps(tmp_path_factory) -> Path:
    """A finished 3-step run of NINE_STEPS with checkpoint-3 (its config.yaml records the demo's optim.lr=0.003),
    trained once per session; tests that continue it work on a copy."""
    return shared_run(tmp_path_factory, "three_steps", [*NINE_STEPS, "train.max_steps=3", "train.save_steps=3"])[1]
