"""The wheel carries recipes and job templates, and an installed vitpipe resolves them without the repo; the
project environment holds its dependencies compiled."""
from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

from conftest import PYTHON, REPO


def test_wheel_bundles_recipes_and_jobs(tmp_path):
    build = subprocess.run([PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("vitpipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pipeline/_bundled/recipes/mae/tiny_fmnist.yaml" in names
    assert "pipeline/_bundled/recipes/mae/vit_huge14.yaml" in names
    for job_file in ("slurm/job.sbatch", "k8s/pod.yaml", "k8s/pytorchjob.yaml", "k8s/jobset.yaml",
                     "clusters/example.yaml"):
        assert f"pipeline/_bundled/jobs/{job_file}" in names
    assert any(n.endswith("entry_points.txt") for n in names)

    target = tmp_path / "site"
    subprocess.run([PYTHON, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    probe = ("import pipeline.resources as r; print(r.find_recipe('mae/vit_large16')); "
             "print(r.bundled('jobs')); print(len(r.list_recipes()))")
    out = subprocess.run([PYTHON, "-c", probe], env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    recipe, jobs, count = out.stdout.split()
    assert recipe.startswith(str(target)) and recipe.endswith("_bundled/recipes/mae/vit_large16.yaml")
    assert jobs.startswith(str(target))
    assert int(count) == len(list((REPO / "recipes").rglob("*.yaml")))


def test_the_environment_holds_compiled_bytecode_of_the_heavy_dependencies():
    """Where Python writes no bytecode (PYTHONDONTWRITEBYTECODE), a process of an environment installed without
    it compiles Lightning, torchmetrics, MLflow and timm from source each time it starts (15 s here):
    scripts/install.sh has them compiled at install time."""
    import importlib.util

    import lightning
    import mlflow
    import timm
    import torchmetrics

    for module in (lightning, torchmetrics, mlflow, timm):
        cached = importlib.util.cache_from_source(module.__file__)
        assert Path(cached).is_file(), f"{module.__name__}: no {cached}"
