"""Shared helpers: running the public entrypoints as commands, offline (`start`, `run_cli`, `run_parallel`),
composing configs, and training runs that many tests read once per session.

`make test` runs the suite on every core with pytest-xdist (`-n auto`, one test module per worker): each worker
and the processes its tests start then use their share of the cores (`pytest_configure`), and a run shared by
tests of several modules is trained by the first worker that needs it while the others wait (`shared_run`).
Commands are processes forked from a server that has imported torch and transformers once per worker, not new
interpreters that import them again each time (tests/launcher.py says what that keeps and when a test asks for a
new interpreter instead)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from filelock import FileLock
from hydra import compose, initialize_config_module

from phi3v_recipes.cli import register_resolvers
from tests import launcher

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
    """The suite runs offline. Under xdist, each worker (and every process its tests start) uses cores / workers
    threads: PyTorch's default of one thread per core in every worker would oversubscribe the machine and spin.
    Set here, before any command starts, so that the fork server (tests/launcher.py) imports its libraries with
    the same environment the commands get."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        os.environ.setdefault("MKL_NUM_THREADS", threads)


def offline_env(**extra: str) -> dict[str, str]:
    """The environment of a command the tests start: the suite's own (offline since `pytest_configure`), unbuffered,
    with `extra`."""
    return dict(os.environ, PYTHONUNBUFFERED="1", **extra)


def start(args: list[str], cwd: Path, module: str = "phi3v_recipes", threads: int | None = None,
          fresh: bool = False, **options) -> launcher.Launched:
    """`python -m <module> args` started in `cwd`, offline (`threads`: its OMP/MKL threads), as a process forked
    from the fork server or, with `fresh`, a new interpreter; see tests/launcher.py for both and the `options`."""
    env = offline_env(**({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}))
    return launcher.start(args, cwd, env, module=module, fresh=fresh, **options)


def run_cli(args: list[str], cwd: Path, module: str = "phi3v_recipes", torchrun_procs: int = 0,
            timeout: int = 600, **options) -> subprocess.CompletedProcess:
    """`python -m <module> args` (or under torchrun, a new interpreter), in `cwd`, offline, waited for; output
    captured as text. `options` as for `start`."""
    if torchrun_procs:
        args = ["--standalone", f"--nproc_per_node={torchrun_procs}", "-m", module, *args]
        module, options = "torch.distributed.run", {**options, "fresh": True}
    return start(args, cwd, module=module, **options).completed(timeout)


def run_parallel(commands: dict[str, list[str]], cwd: Path, timeout: int = 600, fresh: bool = False,
                 pass_fds: tuple[int, ...] = ()) -> dict[str, subprocess.CompletedProcess]:
    """Each `python -m <argv>` (module first) started at once in `cwd`, offline with one thread each; waits for
    all. Output goes to `cwd/.logs/<name>/stdout` and `.../stderr` and comes back as text. `pass_fds`
    stay open in every process (e.g. a pipe a command reads as /proc/self/fd/N; a new interpreter each)."""
    started = {name: start(args[1:], cwd, module=args[0], threads=1, fresh=fresh, logs=cwd / ".logs" / name,
                           pass_fds=pass_fds)
               for name, args in commands.items()}
    return {name: command.completed(timeout) for name, command in started.items()}


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
