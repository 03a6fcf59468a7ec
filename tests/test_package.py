"""lit-factor is a real package: a non-editable install (no checkout on the path) runs a study through its
``lit-factor`` console script, whose trials run the installed ``python -m lit_factor fit``."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_non_editable_install_runs_a_study(tmp_path, glue_writer):
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ and egg-info behind
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "lit_factor", source / "lit_factor", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *isolation,
                          "--target", str(target), str(source)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    work = tmp_path / "work"  # neither the checkout nor the source copy is the working directory
    work.mkdir()
    where = subprocess.run([sys.executable, "-c", "import lit_factor; print(lit_factor.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=600)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr

    root = glue_writer("SST-2", n_train=16, n_dev=8)
    base = work / "tiny.yaml"
    base.write_text(yaml.safe_dump({
        "seed_everything": 1,
        "trainer": {"max_steps": 2, "max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"model_name_or_path": "random:tiny-bert"},
        "data": {"task": "sst2", "batch_size": 8, "max_seq_length": 16}}))
    study = work / "pkg.yaml"
    study.write_text(yaml.safe_dump({"name": "pkg", "base": str(base),
                                     "axes": {"model.factorization.method": ["none", "lowrank"]}, "seeds": [1]}))
    proc = subprocess.run([str(target / "bin" / "lit-factor"), "study", "run", str(study), "--threads", "1",
                           "--root", "logs", "--data-dir", str(root)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2/2 finished" in proc.stdout, proc.stdout


def test_ci_runs_exactly_the_readmes_test_command():
    """CI (``.ci/run``) must run what the README tells a user to run, so that the README's timing and its promise
    ("the whole suite, as CI runs it") stay true."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Test\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    command = block.strip().splitlines()[0].split("#")[0].strip()
    ci_lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.strip()]
    assert command.startswith("python -m pytest") and ci_lines[-1] == command
