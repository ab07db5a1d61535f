"""Recipes ship inside the package: `kdistill list recipes` and `-c cifar/NAME` work after a
plain (non-editable) install, from any working directory."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from kdistill.config import RECIPES, Config, build_config, list_recipes, resolve_config
from kdistill.engine.distill import DistillConfig
from kdistill.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def test_every_recipe_loads_by_name_and_opens_with_its_command():
    recipes = list_recipes()
    assert len(recipes) >= 10 and all(RECIPES in p.parents for p in RECIPES.rglob("*.yaml"))
    for name, command in recipes:
        assert command.startswith("kdistill ") and f"-c {name} " in command, (name, command)
        build_config(DistillConfig if command.split()[1] == "distill" else Config, [name])
        assert resolve_config(name) == resolve_config(f"{name}.yaml") == RECIPES / f"{name}.yaml"


def test_config_arg_prefers_an_existing_file(tmp_path, monkeypatch):
    (tmp_path / "cifar").mkdir()
    own = tmp_path / "cifar" / "kd_resnet56_resnet20.yaml"
    own.write_text("train: {epochs: 3}\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_config("cifar/kd_resnet56_resnet20.yaml") == Path("cifar/kd_resnet56_resnet20.yaml")
    assert resolve_config("cifar/kd_resnet56_resnet20") == RECIPES / "cifar/kd_resnet56_resnet20.yaml"
    assert resolve_config("configs/cifar/kd_resnet56_resnet20.yaml").is_relative_to(RECIPES)  # old paths


def test_unknown_config_names_the_fix():
    with pytest.raises(UserError, match="kdistill list recipes"):
        resolve_config("cifar/no_such_recipe")


@pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="needs the source tree")
def test_non_editable_install_ships_the_recipes(tmp_path):
    """A venv with a regular install of this tree (no deps: they come from the test's own
    site-packages through a .pth line), run from a folder with no configs/ in sight."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "zz_parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the work tree
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "cache", "results",
                                                              "*.egg-info", "build", "__pycache__"))
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONPATH": ""}
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)],
                   check=True, cwd=tmp_path, env=env, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    probe = ("import kdistill, kdistill.config as c; print(kdistill.__file__); "
             "print(len(c.list_recipes())); print(c.resolve_config('cifar/kd_resnet56_resnet20'))")
    out = subprocess.run([str(py), "-c", probe], check=True, cwd=work, env=env,
                         capture_output=True, text=True).stdout.splitlines()
    assert out[0].startswith(str(site)), out  # the installed copy, not the source tree
    assert int(out[1]) == len(list_recipes()) and out[2].startswith(str(site))
    proc = subprocess.run([str(py), "-m", "kdistill", "list", "recipes", "kd_"], cwd=work, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "cifar/kd_resnet56_resnet20" in proc.stdout, proc.stderr
