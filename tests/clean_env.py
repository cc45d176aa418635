"""Clean Python environments for tests: a virtual environment in which phi3v-recipes cannot be imported, sharing
the test interpreter's installed packages (torch, transformers, …), optionally with another transformers first.

A venv is created with `--without-pip` (instant, offline) and given one `.pth` file listing the test
interpreter's site-packages directories. Lines of a `.pth` file are added to `sys.path` as plain entries: the
`.pth` files inside those directories, among them the finder of an editable phi3v-recipes install, are not run,
so the package is not importable there (checked by `clean_python`; a test is skipped when it is, e.g. under a
non-editable install).

`TRANSFORMERS_4` pins the reference code's transformers (what vLLM's Phi-3-V tests pin) with the tokenizers and
huggingface_hub it needs. They are installed once with `pip install --target` under `.cache/clean-env/` (about
40 s; CI's cache keeps them) and put before the shared packages.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "clean-env"
TRANSFORMERS_4 = ("transformers==4.46.3", "tokenizers==0.20.3", "huggingface_hub==0.26.5", "requests==2.32.3",
                  "urllib3==2.2.3", "idna==3.10", "charset-normalizer==3.4.0", "certifi==2024.8.30")


def site_dirs() -> list[str]:
    """The test interpreter's site-packages directories, in path order."""
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


def transformers_4() -> Path:
    """A directory holding `TRANSFORMERS_4`, installed on first use; skips the test when pip cannot install it."""
    target = CACHE / TRANSFORMERS_4[0].replace("==", "-")
    if (target / ".complete").is_file():
        return target
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
               *TRANSFORMERS_4]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot build the transformers 4 environment ({err}): {' '.join(TRANSFORMERS_4)}")
    if done.returncode != 0:
        pytest.skip(f"pip cannot install {' '.join(TRANSFORMERS_4)} here (no package index?): "
                    f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    (target / ".complete").write_text("")
    return target


def clean_python(root: Path, first: Path | None = None) -> Path:
    """The interpreter of a venv at `root` that sees the test interpreter's packages (after `first`, if given)
    but not phi3v-recipes."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    entries = ([str(first)] if first is not None else []) + site_dirs()
    (Path(site) / "shared_packages.pth").write_text("".join(f"{entry}\n" for entry in entries))
    probe = subprocess.run([str(python), "-c", "import phi3v_recipes"], capture_output=True, text=True,
                           env=clean_env_vars(root), cwd=root)
    if probe.returncode == 0:
        pytest.skip("phi3v_recipes is importable from the shared site-packages (a non-editable install): the clean "
                    "environment cannot leave it out")
    assert "No module named 'phi3v_recipes'" in probe.stderr, probe.stderr
    return python


def clean_env_vars(root: Path) -> dict[str, str]:
    """Offline, with its own Hugging Face cache (the remote-code modules land there), run from `root`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return dict(env, HF_HUB_OFFLINE="1", HF_HOME=str(root / "hf"), PYTHONNOUSERSITE="1")
