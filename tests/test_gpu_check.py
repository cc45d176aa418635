"""scripts/gpu_check.sh and scripts/gpu_prepare.sh on a machine without a GPU (issue 15): the check stops at once
with one sentence before installing anything, and the image's package list is the one the wheels are chosen by."""

import re
import subprocess
import sys

from tests.conftest import ROOT

# What the GPU check needs beyond the lent image: gpu_prepare.sh must pack these, so the list must not hold them.
CARRIED = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "datasets", "deepspeed", "bitsandbytes",
           "liger-kernel", "flash-attn")


def _check(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "GPU_SITE": str(tmp_path / "site"),
           "RESULTS": str(tmp_path / "results" / "results.jsonl")}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_gpu_check_without_a_cuda_gpu_stops_at_once_before_installing(tmp_path):
    """Without CUDA, `scripts/gpu_check.sh tests` exits 2 with one `error:` sentence saying no CUDA GPU is visible
    (no pip, no network error), installs nothing and writes no results; an unknown phase is one sentence too."""
    out = _check(tmp_path, "tests")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().startswith("error: no CUDA GPU is visible to") and len(out.stderr.splitlines()) == 1
    assert not (tmp_path / "site").exists() and not (tmp_path / "results").exists()
    out = _check(tmp_path, "bench-everything")
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: unknown phase 'bench-everything'; choose from: tests bench-full bench-lora bench-qlora all.")


def test_image_package_list_is_one_pinned_name_per_line():
    """scripts/gpu_image_packages.txt holds one package a line (name, or name==version where it was read), pins
    the image's torch 2.11.0 and transformers 5.17.0, and lists none of the packages the check must carry."""
    lines = [line for line in (ROOT / "scripts" / "gpu_image_packages.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(==[A-Za-z0-9.+]+)?", line) for line in lines), lines
    names = [line.split("==")[0].lower() for line in lines]
    assert len(names) == len(set(names)) and "torch==2.11.0" in lines and "transformers==5.17.0" in lines
    assert not set(CARRIED) & set(names)
    hashes = {subprocess.run(["bash", str(ROOT / "scripts" / "gpu_prepare.sh"), "--sources-hash"], capture_output=True,
                             text=True, check=True).stdout.strip() for _ in range(2)}
    assert len(hashes) == 1 and re.fullmatch(r"[0-9a-f]{64}", hashes.pop())
