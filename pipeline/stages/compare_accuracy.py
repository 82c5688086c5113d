"""`vitpipe compare --fashion-mnist`: ViTs and a CNN at an equal supervised budget on Fashion-MNIST, on CPU.

Every row trains for the same supervised steps of the same batch with the same augmentation (random resized
crops, mixup / cutmix on half the batches, label smoothing) and is measured on the same held-out images:

- resnet10t from scratch (``classify/resnet_fmnist``); it is also the DeiT row's teacher;
- a tiny ViT from scratch (``finetune/tiny_fmnist`` with ``model.from_scratch``: the MAE row's architecture);
- the same ViT fine-tuned from MAE (``mae/tiny_fmnist`` at that size, then ``finetune/tiny_fmnist``);
- a DeiT student of the same size distilled (hard) from the resnet10t (``deit/tiny_fmnist``).

The MAE pretraining and the teacher's training are costs the supervised budget does not count; they get their
own columns. Writes ``accuracy.csv`` and ``accuracy.png`` (top-1 against the training throughput measured in
each run)."""
from __future__ import annotations

import csv
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mlflow import MlflowClient

from ..console import duration, report
from ..data.manifest import MANIFEST_NAME
from ..recipe import load_recipe
from .shard import shard_fashion_mnist
from .train import train

# The ViT of every ViT row: DeiT-tiny_fmnist's size (width 96, 4 blocks, 3 heads, patch 4 at 32 px)
VIT = {"model.encoder.embed_dim": 96, "model.encoder.depth": 4, "model.encoder.num_heads": 3}
# One augmentation for every row (the ViT recipes' own): mixup 0.8 / cutmix 1.0 on half the batches
MIXUP = {"model.mixup.mixup_alpha": 0.8, "model.mixup.cutmix_alpha": 1.0, "model.mixup.prob": 0.5,
         "model.mixup.switch_prob": 0.5}
MAE_MODEL, CNN_MODEL = "vitpipe-compare-mae", "vitpipe-compare-cnn"


@dataclass
class AccuracyRow:
    model: str
    params_m: float
    top1: float
    train_images_per_s: float
    wall_s: float
    """The supervised run, start to held-out top-1."""
    pretrain_s: float = 0.0
    """MAE pretraining before it (not part of the supervised budget)."""
    teacher_s: float = 0.0
    """Training the teacher it distils from (not part of the supervised budget)."""


def compare_accuracy(workdir: str | Path, steps: int = 600, mae_steps: int = 600, eval_limit: int | None = None,
                     shards: str | Path | None = None, overrides: dict | None = None) -> list[AccuracyRow]:
    """Train every row in ``workdir`` (its MLflow store, checkpoints, ``compare/accuracy.csv`` and ``.png``) on
    ``shards`` (a folder with labelled train/ and val/ splits; default: Fashion-MNIST sharded into the workdir);
    ``overrides`` apply to every run (e.g. the trainer's device)."""
    work = Path(workdir).resolve()
    if shards is None:
        shards = work / "shards" / "fmnist"
        if not (shards / "val" / MANIFEST_NAME).exists():
            shard_fashion_mnist(str(shards))
    shards = Path(shards)
    uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    (work / "mlflow").mkdir(parents=True, exist_ok=True)
    common = {"data.train": str(shards / "train"), "data.val": str(shards / "val"), "tracking.uri": uri,
              "tracking.experiment": "vitpipe-compare", "trainer.global_batch": 128, **(overrides or {})}
    supervised = {**common, **MIXUP, "trainer.max_steps": steps, "model.eval_limit": eval_limit}
    run = Runner(work, uri)

    cnn = run("resnet10t", "classify/resnet_fmnist",
              {**supervised, "register.name": CNN_MODEL, "register.alias": "teacher"})
    mae_s, _ = run.timed("MAE pretraining", "mae/tiny_fmnist", {
        **common, "trainer.max_steps": mae_steps, "monitor.every_n_steps": 0, "tracking.recon_every_n_steps": 0,
        **VIT, "register.name": MAE_MODEL, "register.alias": "compare"})
    mae_uri = f"models:/{MAE_MODEL}@compare"
    scratch = run("ViT from scratch", "finetune/tiny_fmnist",
                  {**supervised, "model.init": mae_uri, "model.from_scratch": True, "optim.layer_decay": 1.0,
                   "register.name": None})
    tuned = run("ViT fine-tuned from MAE", "finetune/tiny_fmnist",
                {**supervised, "model.init": mae_uri, "register.name": None})
    tuned.pretrain_s = mae_s
    deit = run("DeiT student, hard distillation from resnet10t", "deit/tiny_fmnist",
               {**supervised, **VIT, "model.distill.kind": "hard",
                "model.teacher.model": f"models:/{CNN_MODEL}@teacher"})
    deit.teacher_s = cnn.wall_s
    rows = [cnn, scratch, tuned, deit]
    out = work / "compare"
    out.mkdir(parents=True, exist_ok=True)
    with (out / "accuracy.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    plot(rows, out / "accuracy.png", steps)
    report.info(table(rows, steps, eval_limit))
    report.info(f"compare: {out / 'accuracy.csv'}, {out / 'accuracy.png'}; runs in {uri}")
    return rows


class Runner:
    """Runs one built-in recipe with overrides in this process and reads back what its MLflow run measured."""

    def __init__(self, work: Path, uri: str):
        self.work, self.client = work, MlflowClient(uri)

    def timed(self, name: str, recipe_name: str, overrides: dict) -> tuple[float, str]:
        slug = name.split(",")[0].lower().replace(" ", "-")
        recipe = load_recipe(recipe_name, {**overrides, "checkpoint.dir": str(self.work / "runs" / slug),
                                           "checkpoint.keep_last": 1})
        report.info(f"compare: {name} ({recipe_name}, {recipe.trainer.max_steps} steps)")
        start = time.perf_counter()
        result = train(recipe, resume="none")
        return time.perf_counter() - start, result.run_id

    def __call__(self, name: str, recipe_name: str, overrides: dict) -> AccuracyRow:
        seconds, run_id = self.timed(name, recipe_name, overrides)
        run = self.client.get_run(run_id)
        rates = [m.value for m in self.client.get_metric_history(run_id, "perf/images_per_s")]
        params = int(run.data.params["model.parameters"]) / 1e6
        return AccuracyRow(name, params, run.data.metrics["val/top1"], statistics.median(rates) if rates else 0.0,
                           seconds)


def table(rows: list[AccuracyRow], steps: int, eval_limit: int | None) -> str:
    held_out = f"the first {eval_limit}" if eval_limit else "all 10,000"
    lines = [(f"Fashion-MNIST at an equal supervised budget: {steps} steps of 128 images, the same augmentation; "
              f"top-1 on {held_out} held-out images"), "",
             "| model | params | top-1 | training img/s | supervised wall | MAE pretraining | teacher training |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = [duration(s) if s else "-" for s in (r.pretrain_s, r.teacher_s)]
        lines.append(f"| {r.model} | {r.params_m:.2f} M | {r.top1:.1%} | {r.train_images_per_s:.0f} | "
                     f"{duration(r.wall_s)} | {extra[0]} | {extra[1]} |")
    return "\n".join(lines)


def plot(rows: list[AccuracyRow], path: Path, steps: int) -> Path:
    from ..inspection.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for r in rows:
        cnn = r.model.startswith("resnet")
        ax.scatter(r.train_images_per_s, 100 * r.top1, marker="s" if cnn else "o",
                   color="tab:orange" if cnn else "tab:blue")
        ax.annotate(r.model, (r.train_images_per_s, 100 * r.top1), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("training images/s in the run (this machine)")
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title(f"Fashion-MNIST, {steps} supervised steps of 128 each", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
