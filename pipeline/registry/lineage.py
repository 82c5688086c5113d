"""What produced a model: code version, run, recipe and data, as MLflow tags.

Tag names are shared by runs and model versions, so a user can walk from a registered version back to the
run (``vitpipe.run_id``), the recipe (``vitpipe.recipe_hash`` and the run's ``recipe.yaml`` artifact), the
data (``vitpipe.manifest`` URL and ``vitpipe.manifest_hash``) and the code (``vitpipe.git_commit``).
"""
from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

RUN_ID = "vitpipe.run_id"
GIT_COMMIT = "vitpipe.git_commit"
RECIPE_HASH = "vitpipe.recipe_hash"
MANIFEST = "vitpipe.manifest"
MANIFEST_HASH = "vitpipe.manifest_hash"
# Copied from the training run to the model version it produced.
RUN_LINEAGE = (GIT_COMMIT, "vitpipe.git_dirty", "vitpipe.version", RECIPE_HASH, MANIFEST, MANIFEST_HASH,
               "vitpipe.task")


def code_version() -> dict[str, str]:
    """The package version and, when it runs from a git checkout, the commit and whether it has edits."""
    tags = {"vitpipe.version": _package_version()}
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        tags[GIT_COMMIT], tags["vitpipe.git_dirty"] = commit, str(bool(dirty)).lower()
    except (OSError, subprocess.SubprocessError):  # an installed wheel: the version is all there is
        tags[GIT_COMMIT] = "unknown (installed package)"
    return tags


def _package_version() -> str:
    try:
        return metadata.version("vitpipe")
    except metadata.PackageNotFoundError:
        return "unknown"


def version_tags(run: Any, export_meta: dict[str, Any]) -> dict[str, str]:
    """Tags for a model version registered from ``run`` (an MLflow Run) and its export metadata."""
    tags = {RUN_ID: run.info.run_id, "vitpipe.experiment_id": run.info.experiment_id,
            "vitpipe.recipe_artifact": "recipe.yaml", "vitpipe.step": str(export_meta.get("step", ""))}
    tags.update({k: run.data.tags[k] for k in RUN_LINEAGE if k in run.data.tags})
    if export_meta.get("recipe_hash"):
        tags[RECIPE_HASH] = export_meta["recipe_hash"]
    return tags
