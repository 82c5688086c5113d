"""The demo: the whole chain on Fashion-MNIST on CPU. Shard -> MAE pretrain (with its monitors) -> register ->
kNN and linear probe of the registered encoder beside the same encoder at random initialisation and raw pixels
-> fine-tuning of the pretrained encoder and of the same architecture from random init, for the same steps ->
their mean attention distance side by side. Every figure is measured on the same held-out images."""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow import MlflowClient

from ..console import duration, report, vitpipe_executable
from ..data.manifest import MANIFEST_NAME
from ..evaluation.config import EvalConfig, MonitorConfig
from ..evaluation.features import encoder_embedding, pixel_embedding
from ..exports.vit import encoder_config
from ..inspection.plots import distance_plot
from ..models import ViTEncoder
from ..recipe import load_recipe
from .evaluate import evaluate_embedding, evaluate_model
from .inspect import inspect_model, measure_attention
from .shard import shard_fashion_mnist
from .train import train

DEMO_RECIPE = "mae/tiny_fmnist"
FINETUNE_RECIPE = "finetune/tiny_fmnist"
DEMO_MODEL = "vitpipe-demo-mae"
DEMO_ALIAS = "demo"
# Sized so the whole demo stays within ten minutes on two CPU cores: frozen-feature evaluation reads 7,000
# images per encoder, and each fine-tune sees 9,600 (1/6 of an epoch: where pretraining matters most).
EVAL_TRAIN, EVAL_VAL = 5_000, 2_000
FINETUNE_STEPS, FINETUNE_BATCH = 150, 64
INSPECT_IMAGES = 128


@dataclass
class Finetuned:
    top1: float
    seconds: float
    run_id: str


def demo(workdir: str = "vitpipe-demo", steps: int | None = None, overrides: dict[str, str] | None = None,
         resume: str | None = "auto", eval_train: int = EVAL_TRAIN, eval_val: int = EVAL_VAL,
         finetune_steps: int = FINETUNE_STEPS) -> dict:
    start = time.perf_counter()
    work = Path(workdir).resolve()
    shards = work / "shards" / "fmnist"
    if not (shards / "train" / MANIFEST_NAME).exists() or not (shards / "val" / MANIFEST_NAME).exists():
        report.info(f"demo: sharding Fashion-MNIST into {shards}")
        shard_fashion_mnist(str(shards))
    store = {"data.train": str(shards / "train"), "data.val": str(shards / "val"),
             "tracking.uri": f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"}
    settings = {**store, "checkpoint.dir": str(work / "checkpoints"), "register.name": DEMO_MODEL,
                "register.alias": DEMO_ALIAS}
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
    random_init = ViTEncoder(encoder_config(result.ref.metadata()["encoder"])).eval()  # same architecture
    rows = {"MAE-pretrained encoder": result.metrics,
            "same encoder, random init": evaluate_embedding(encoder_embedding(random_init, cfg.pool), cfg, transform),
            "raw pixels": evaluate_embedding(pixel_embedding, cfg, transform)}

    tuned = {name: finetune(model_uri, scratch, store, work, finetune_steps, eval_val, resume)
             for name, scratch in (("MAE-pretrained encoder", False), ("same architecture, random init", True))}

    client = MlflowClient(trained.tracking_uri)
    figures = work / "inspect"
    inspected = inspect_model(model_uri, str(shards / "val"), INSPECT_IMAGES, tracking=recipe.tracking, out=figures)
    norm = result.ref.metadata()["normalisation"]
    distances = {"MAE-pretrained": inspected.distances,
                 "random init": measure_attention(random_init, str(shards / "val"), norm, INSPECT_IMAGES).distances}
    plot = distance_plot({f"{name} encoder: mean attention distance": d for name, d in distances.items()},
                         figures / "mean_attention_distance_vs_random_init.png", max(random_init.cfg.image_size))
    client.log_artifact(result.run_id, str(plot))

    table = "\n\n".join([comparison_table(rows, cfg, trained.global_step),
                         finetune_table(tuned, finetune_steps, eval_val),
                         monitor_line(client, trained.run_id, recipe.monitor), distance_line(distances)])
    report.info(table)
    client.log_text(result.run_id, table, "demo_comparison.md")
    report.info(f"demo: tables and the attention-distance plot logged to MLflow run {result.run_id}, figures in "
                f"{figures}; done in {duration(time.perf_counter() - start)}")
    report.info(next_steps(work, shards, model_uri, trained.tracking_uri, cfg))
    return {"frozen": rows, "finetuned": tuned, "distances": distances}


def finetune(model_uri: str, scratch: bool, store: dict[str, str], work: Path, steps: int, eval_val: int,
             resume: str | None) -> Finetuned:
    """The demo's short fine-tune of ``model_uri`` (``scratch``: of its architecture from random init), held-out
    top-1 on the first ``eval_val`` test images. A run this short takes a higher rate (1e-3 at batch 64) and no
    mixup, which regularises long runs and only slows a short one. Layer-wise lr decay is a pretrained encoder's
    setting (its lower layers already hold features); the from-scratch run trains every layer at the full rate,
    as DeiT does. Otherwise both runs are the same."""
    start = time.perf_counter()
    kind = "scratch" if scratch else "pretrained"
    recipe = load_recipe(FINETUNE_RECIPE, {
        **store, "model.init": model_uri, "model.from_scratch": scratch, "model.eval_limit": eval_val,
        "trainer.max_steps": steps, "trainer.global_batch": FINETUNE_BATCH, "optim.warmup_steps": steps // 10,
        "optim.base_lr": 4e-3, "model.mixup.prob": 0.0,
        "register.name": None, "checkpoint.dir": str(work / f"finetune-{kind}"),
        "checkpoint.every_n_steps": steps, "checkpoint.keep_last": 1, **({"optim.layer_decay": 1.0} if scratch else {})})
    report.info(f"demo: fine-tuning the {kind} encoder ({FINETUNE_RECIPE}, {steps} steps of {FINETUNE_BATCH})")
    result = train(recipe, resume=resume)
    top1 = MlflowClient(result.tracking_uri).get_run(result.run_id).data.metrics["val/top1"]
    return Finetuned(top1, time.perf_counter() - start, result.run_id)


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
        f"  fine-tune it for longer ({FINETUNE_RECIPE}: 300 steps of 128), registered as a classifier:",
        f"    {exe} finetune --config {FINETUNE_RECIPE} --model {model_uri} --tracking.uri {q(tracking_uri)} "
        f"--data.train {q(str(shards / 'train'))} --data.val {q(str(shards / 'val'))} "
        f"--checkpoint.dir {q(str(work / 'finetune-checkpoints'))}",
    ])


def comparison_table(rows: dict[str, dict[str, float]], cfg: EvalConfig, steps: int) -> str:
    any_row = next(iter(rows.values()))
    lines = [f"Frozen features: Fashion-MNIST, {int(any_row['train_samples'])} train / "
             f"{int(any_row['val_samples'])} held-out images (subsets of 60k / 10k, to fit the demo's time); "
             f"MAE pretrained {steps} steps",
             "", f"| features | kNN top-1 (k={cfg.knn.k}) | linear probe top-1 |", "|---|---|---|"]
    for name, m in rows.items():
        lines.append(f"| {name} | {m.get('knn_top1', float('nan')):.1%} | {m.get('linear_top1', float('nan')):.1%} |")
    return "\n".join(lines)


def finetune_table(tuned: dict[str, Finetuned], steps: int, eval_val: int) -> str:
    lines = [f"Fine-tuned: {steps} steps of {FINETUNE_BATCH} images ({FINETUNE_RECIPE} at lr 1e-3, no mixup), "
             f"top-1 on the same "
             f"{eval_val} held-out images", "", "| encoder | fine-tuned top-1 | wall |", "|---|---|---|"]
    lines += [f"| {name} | {t.top1:.1%} | {duration(t.seconds)} |" for name, t in tuned.items()]
    return "\n".join(lines)


def monitor_line(client: MlflowClient, run_id: str, monitor: MonitorConfig) -> str:
    """The pretraining monitor's kNN curve, first and last look (on its own bank and queries, so not the
    table's figure)."""
    curve = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "monitor/knn_top1"))
    if not curve:
        return "Monitor: no look during pretraining (monitor.every_n_steps exceeds the steps)"
    (s0, first), (s1, last) = curve[0], curve[-1]
    return (f"Monitor during pretraining (kNN top-1, bank of {monitor.max_train} / {monitor.max_val} queries): "
            f"{first:.1%} at step {s0}, {last:.1%} at step {s1}")


def distance_line(distances: dict[str, torch.Tensor]) -> str:
    """Mean over heads of the first and last layers' mean attention distance, per encoder."""
    parts = [f"{name} {d[0].mean():.1f} px in layer 1, {d[-1].mean():.1f} px in layer {d.shape[0]}"
             for name, d in distances.items()]
    return "Mean attention distance (mean over heads): " + "; ".join(parts)
