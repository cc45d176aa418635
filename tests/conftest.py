"""Shared helpers: running the public entrypoint in a subprocess, offline, and composing configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from phi3v_recipes.config import register_resolvers

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


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def compose_config(*overrides: str):
    register_resolvers()
    with initialize_config_module(config_module="phi3v_recipes.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="session")
def default_demo(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """README's main job, run once per session: `python -m phi3v_recipes` with no task options."""
    root = tmp_path_factory.mktemp("default_demo")
    out = run_cli([f"run.output_dir={root / 'run'}"], cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return out, root / "run"
