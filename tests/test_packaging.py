"""The wheel ships every module and every config: Hydra finds `conf/` as the package `phi3v_recipes.conf`, so a
non-editable install must carry all of it."""

import importlib.util
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package():
    """pyproject.toml lists packages by hand (because of the conf mapping): none may be missing. The namespace
    package hydra_plugins (no __init__.py) is listed too, so that Hydra finds our sweeper in an editable install."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT / "src").parts) for init in (ROOT / "src").rglob("__init__.py")
    }
    assert found | {"phi3v_recipes.conf", "hydra_plugins"} == listed


@pytest.mark.slow
def test_wheel_contains_all_modules_and_configs(tmp_path):
    """A built wheel holds every module and template under src/ and every yaml under conf/ (as
    phi3v_recipes/conf/...)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(ROOT / "src")) for p in (ROOT / "src").rglob("*.py")}
    expected |= {str(p.relative_to(ROOT / "src")) for p in (ROOT / "src").rglob("*.j2")}  # report templates
    expected |= {"phi3v_recipes/conf/" + str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert expected <= names, sorted(expected - names)


@pytest.mark.slow
def test_non_editable_install_finds_its_configs(tmp_path):
    """Installed from the wheel (not editable, run away from the checkout), the entrypoint composes its configs
    from the installed package."""
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    *map(str, wheels.glob("*.whl"))], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    code = "import phi3v_recipes, sys; print(phi3v_recipes.__file__)"
    where = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    out = subprocess.run([sys.executable, "-m", "phi3v_recipes", "--cfg", "job", "--resolve", "task=nlvr2", "hardware=a100"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    gpu_attention = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex_attention"
    assert f"attn_implementation: {gpu_attention}" in out.stdout and "lr: 1.0e-05" in out.stdout
