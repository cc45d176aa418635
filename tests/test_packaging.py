"""The wheel ships every module and every config: Hydra finds `conf/` as the package `phi3v_recipes.conf`, so a
non-editable install must carry all of it."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package():
    """pyproject.toml lists packages by hand (because of the conf mapping): none may be missing."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT / "src").parts) for init in (ROOT / "src").rglob("__init__.py")
    }
    assert found | {"phi3v_recipes.conf"} == listed


@pytest.mark.slow
def test_wheel_contains_all_modules_and_configs(tmp_path):
    """A built wheel holds every module under src/ and every yaml under conf/ (as phi3v_recipes/conf/...)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(ROOT / "src")) for p in (ROOT / "src").rglob("*.py")}
    expected |= {"phi3v_recipes/conf/" + str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert expected <= names, sorted(expected - names)
