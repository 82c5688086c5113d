"""The demo: the whole chain on Fashion-MNIST on CPU. Shard -> MAE pretrain -> register -> kNN and linear
probe of the registered encoder, compared with the same encoder at random initialisation and with raw
pixels, evaluated on the same images."""
from __future__ import annotations

import shlex
from pathlib import Path

import torch
from mlflow import MlflowClient

from ..console import report, vitpipe_executable
from ..data.manifest import MANIFEST_NAME
from ..evaluation.config import EvalConfig
from ..evaluation.features import encoder_embedding, pixel_embedding
from ..exports.vit import encoder_config
from ..models import ViTEncoder
from ..recipe import load_recipe
from .evaluate import evaluate_embedding, evaluate_model
from .shard import shard_fashion_mnist
from .train import train

DEMO_RECIPE = "mae/tiny_fmnist"
FINETUNE_RECIPE = "finetune/tiny_fmnist"
DEMO_MODEL = "vitpipe-demo-mae"
DEMO_ALIAS = "demo"
# Evaluation subsets sized so the whole demo stays within about a quarter of an hour on two CPU cores.
EVAL_TRAIN, EVAL_VAL = 10_000, 2_000


def demo(workdir: str = "vitpipe-demo", steps: int | None = None, overrides: dict[str, str] | None = None,
         resume: str | None = "auto", eval_train: int = EVAL_TRAIN, eval_val: int = EVAL_VAL) -> dict:
    work = Path(workdir).resolve()
    shards = work / "shards" / "fmnist"
    if not (shards / "train" / MANIFEST_NAME).exists() or not (shards / "val" / MANIFEST_NAME).exists():
        report.info(f"demo: sharding Fashion-MNIST into {shards}")
        shard_fashion_mnist(str(shards))
    settings = {
        "data.train": str(shards / "train"),
        "data.val": str(shards / "val"),
        "checkpoint.dir": str(work / "checkpoints"),
        "tracking.uri": f"sqlite:///{work / 'mlflow' / 'mlflow.db'}",
        "register.name": DEMO_MODEL,
        "register.alias": DEMO_ALIAS,
    }
    if steps is not None:
        settings["trainer.max_steps"] = str(steps)
    settings.update(overrides or {})
    (work / "mlflow").mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(DEMO_RECIPE, settings)
    report.info(f"demo: pretraining recipe {DEMO_RECIPE} for {recipe.trainer.max_steps} steps on CPU")
    trained = train(recipe, resume=resume)

    model_uri = f"models:/{recipe.register.name}@{recipe.register.alias}"
    cfg = EvalConfig(train=str(shards / "train"), val=str(shards / "val"), max_train=eval_train,
                     max_val=eval_val, crop_pct=1.0)  # 28 px images: resize to the model's 32 px, no crop
    report.info(f"demo: evaluating {model_uri} (kNN k={cfg.knn.k}, linear probe) on {eval_train} train / "
                f"{eval_val} held-out images, and the baselines on the same images")
    result = evaluate_model(model_uri, cfg, recipe.tracking)
    transform = result.transform
    torch.manual_seed(recipe.seed)
    random_init = ViTEncoder(encoder_config(result.ref.metadata()["encoder"]))  # same architecture, fresh init
    rows = {"MAE-pretrained encoder": result.metrics,
            "same encoder, random init": evaluate_embedding(encoder_embedding(random_init, cfg.pool), cfg, transform),
            "raw pixels": evaluate_embedding(pixel_embedding, cfg, transform)}
    table = comparison_table(rows, cfg, trained.global_step)
    report.info(table)
    MlflowClient(trained.tracking_uri).log_text(result.run_id, table, "demo_comparison.md")
    report.info(next_steps(work, shards, model_uri, trained.tracking_uri, cfg))
    return rows


def next_steps(work: Path, shards: Path, model_uri: str, tracking_uri: str, cfg: EvalConfig) -> str:
    """The commands to go on from the demo, each ready to paste into a fresh shell in any folder."""
    exe, q = vitpipe_executable(), shlex.quote
    store = f"--tracking-uri {q(tracking_uri)}"
    splits = f"--train {q(str(shards / 'train'))} --val {q(str(shards / 'val'))}"
    return "\n".join([
        "next steps (each works as printed, from any folder):",
        "  browse the runs, the reconstructions and the registered model in MLflow's UI:",
        f"    {exe} ui --workdir {q(str(work))}",
        "  evaluate the registered encoder again (at another resolution: add --image-size 48):",
        f"    {exe} evaluate --model {model_uri} {store} {splits} --max-train {cfg.max_train} "
        f"--max-val {cfg.max_val} --crop-pct {cfg.crop_pct}",
        f"  fine-tune it with a classification head ({FINETUNE_RECIPE}), registered as a classifier:",
        f"    {exe} finetune --config {FINETUNE_RECIPE} --model {model_uri} --tracking.uri {q(tracking_uri)} "
        f"--data.train {q(str(shards / 'train'))} --data.val {q(str(shards / 'val'))} "
        f"--checkpoint.dir {q(str(work / 'finetune-checkpoints'))}",
    ])


def comparison_table(rows: dict[str, dict[str, float]], cfg: EvalConfig, steps: int) -> str:
    any_row = next(iter(rows.values()))
    lines = [f"Fashion-MNIST, {int(any_row['train_samples'])} train / {int(any_row['val_samples'])} held-out "
             f"images (subsets of 60k / 10k, to fit the demo's time); MAE pretrained {steps} steps",
             "", f"| features | kNN top-1 (k={cfg.knn.k}) | linear probe top-1 |", "|---|---|---|"]
    for name, m in rows.items():
        lines.append(f"| {name} | {m.get('knn_top1', float('nan')):.1%} | {m.get('linear_top1', float('nan')):.1%} |")
    return "\n".join(lines)
