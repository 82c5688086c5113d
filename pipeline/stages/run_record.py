"""A training run's bookkeeping, apart from training: its checkpoint folder, the MLflow run it starts or
continues, the copies of its recipe (checkpoint root, mirror), and the summary it ends with."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from lightning.pytorch.utilities import rank_zero_only

from ..checkpoint.mirror import Mirror
from ..checkpoint.resume import ResumePoint
from ..checkpoint.store import CONFIG, RUN_ID
from ..config import flatten
from ..data.datamodule import ShardDataModule
from ..guard import Rollback
from ..recipe import RunRecipe
from ..registry.lineage import MANIFEST, MANIFEST_HASH, RECIPE_HASH, code_version
from ..tracking import make_logger, resolve_uri
from ..tracking.final_status import settle as settle_final_status
from ..tracking.mlflow_setup import run_exists
from ..tracking.secrets import scrub, scrub_url, without_userinfo

log = logging.getLogger(__name__)


class RunSummary:
    """The lines a run ends with. Whoever has something to report adds a line (the objective's end-of-run
    step: held-out top-1, registration); the stage shows them once, on global rank 0."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def __str__(self) -> str:
        return "\n".join(self.lines)


@dataclass
class TrainResult:
    run_id: str
    tracking_uri: str
    experiment: str
    checkpoint: Path | None
    global_step: int
    last_loss: float | None
    tracking_failures: int = 0
    """Logging calls to MLflow that failed or were dropped while the server was unreachable."""
    preempted: int | None = None
    """The signal (SIGUSR1, SIGTERM) that stopped the run after a checkpoint; None when it ran to its end."""
    is_global_zero: bool = True
    rollback: Rollback | None = None
    """Set when the guard stopped the run to roll it back (``stages.train`` restarts it)."""
    summary: RunSummary = field(default_factory=RunSummary)


class RunRecord:
    """One MLflow run per training run: a resume continues the run that wrote the checkpoints. Only global
    rank 0 talks to MLflow and writes the run's files."""

    def __init__(self, recipe: RunRecipe, resume: ResumePoint | None):
        self.recipe, self.resume = recipe, resume
        self.root = Path(recipe.checkpoint.dir)
        self.run_file = self.root / RUN_ID
        self.mirror = Mirror(recipe.checkpoint.mirror) if recipe.checkpoint.mirror else None
        self.previous = _previous_run(resume, self.run_file)

    def open_logger(self):
        """The MLflow logger on global rank 0 (None elsewhere). Processes started by a launcher (torchrun,
        srun) all reach this at once: the others must not open the tracking store too (a new SQLite store
        migrates its schema)."""
        if rank_zero_only.rank != 0:
            return None
        uri = resolve_uri(self.recipe.tracking)
        if self.previous is not None and not run_exists(uri, self.previous):
            log.warning("%s names MLflow run %s, which %s does not hold (checkpoints moved to another tracking "
                        "store?): this resume starts a new run", self.run_file, self.previous, scrub_url(uri))
            self.previous = None
        return make_logger(self.recipe.tracking, self.recipe.name, run_id=self.previous)

    def write_config(self, folder: Path) -> None:
        """The resolved recipe beside a checkpoint's state (what export and register rebuild it from)."""
        (folder / CONFIG).write_text(self.recipe.to_yaml())

    def begin(self, logger, datamodule: ShardDataModule, tags: dict[str, str], params: dict[str, str]) -> None:
        """On global rank 0 before training: a new run's params, recipe and lineage tags; the run file and the
        recipe at the checkpoint root (and in the mirror)."""
        recipe = self.recipe
        if self.previous is None:
            _start_run(logger, recipe, datamodule, tags, params)
        else:  # the end of the run this one continues, if the server missed it, then that run goes on
            settle_final_status(self.root, resolve_uri(recipe.tracking))
            logger.mark_resumed()
        if recipe.checkpoint.enabled:
            self.root.mkdir(parents=True, exist_ok=True)
            self.write_config(self.root)
            self.run_file.write_text(json.dumps({"run_id": logger.run_id}))
            if self.mirror is not None:
                self.mirror.put_text(CONFIG, recipe.to_yaml())
                self.mirror.put_text(RUN_ID, self.run_file.read_text())

    def check_resume(self) -> None:
        if self.resume is not None:
            _warn_changed_config(self.resume.folder, self.recipe)
            log.warning("resuming from %s", self.resume.folder)


def _start_run(logger, recipe: RunRecipe, datamodule: ShardDataModule, extra: dict[str, str],
               params: dict[str, str]) -> None:
    """Params (the recipe's and the stage's own), recipe artifact and lineage tags of a new run (secrets
    scrubbed)."""
    clean = scrub(recipe.to_dict())
    logger.log_hyperparams({**flatten(clean), **scrub(params)})
    logger.experiment.log_text(logger.run_id, yaml.safe_dump(clean, sort_keys=False), "recipe.yaml")
    tags = {**code_version(), "vitpipe.task": recipe.task, RECIPE_HASH: recipe.digest(),
            MANIFEST: scrub_url(datamodule.manifest.location), MANIFEST_HASH: datamodule.manifest.digest(), **extra}
    for key, value in tags.items():
        logger.experiment.set_tag(logger.run_id, key, value)


def _previous_run(resume: ResumePoint | None, run_file: Path) -> str | None:
    """The MLflow run of the checkpoints a resume continues (from the mirror when the checkpoint comes from it)."""
    if resume is None:
        return None
    text = Mirror(resume.fetch.mirror).get_text(RUN_ID) if resume.fetch else None
    if text is None and run_file.exists():
        text = run_file.read_text()
    return json.loads(text)["run_id"] if text else None


def _comparable(recipe: dict) -> dict:
    """Flat recipe values without URL userinfo: credentials are no part of a recipe, so a URI written with a
    password (older checkpoints), with "***" or with none names the same server."""
    return {k: without_userinfo(v) if isinstance(v, str) else v for k, v in flatten(recipe).items()}


def _warn_changed_config(checkpoint: Path, recipe: RunRecipe) -> None:
    saved_file = checkpoint / CONFIG
    if not saved_file.exists():
        return
    saved = _comparable(yaml.safe_load(saved_file.read_text()))
    now = _comparable(recipe.to_dict())
    changed = sorted(k for k, v in now.items() if saved.get(k) != v) + sorted(set(saved) - set(now))
    if changed:
        log.warning("recipe differs from the checkpoint's in: %s", ", ".join(changed))
