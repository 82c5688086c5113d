"""`vitpipe inspect`: what a ViT encoder attends to. Mean attention distance per layer and head (plot and
CSV), the last layer's CLS attention per head and the attention rollout overlaid on images (a PNG grid),
logged to MLflow: a run nested under the model's training run when the model is registered (its first and
last layers' mean distance tagged onto the version), else a run in the ``vitpipe-inspect`` experiment."""
from __future__ import annotations

import csv
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from ..console import report
from ..evaluation.features import EvalTransform, LabelledSplit
from ..inspection.attention import attention_rollout, cls_maps, encoder_attention, mean_attention_distance
from ..inspection.plots import attention_grid, distance_plot
from ..models import ViTEncoder
from ..registry import ModelRef, load_model_encoder, resolve_model, tag_version
from ..tracking import TrackingConfig, resolve_uri
from ..tracking.secrets import scrub_url
from ..tracking.stores import require_store
from .evaluate import open_model_run

DEFAULT_EXPERIMENT = "vitpipe-inspect"
SHOWN = 8  # images in the attention grid


@dataclass
class InspectResult:
    distances: torch.Tensor
    """[layers, heads] mean attention distance in pixels."""
    run_id: str
    files: list[Path]
    images: int


def inspect_model(model_uri: str, images: str, n: int = 128, image_size: tuple[int, int] | None = None,
                  tracking: TrackingConfig | None = None, out: str | Path | None = None,
                  experiment: str | None = None) -> InspectResult:
    """Inspect ``model_uri`` on the first ``n`` images of the shard split ``images``; figures are written to
    ``out`` (default: a temporary folder) and logged to MLflow."""
    tracking = tracking or TrackingConfig()
    registered = model_uri.startswith("models:/")
    uri = resolve_uri(tracking, where="--tracking-uri", create=not registered)
    ref = resolve_model(model_uri, require_store(uri) if registered else uri)
    encoder = load_model_encoder(ref, image_size).eval()  # a timm CNN: ModelError, it has no ViT attention
    cfg = encoder.cfg
    att = measure_attention(encoder, images, ref.metadata()["normalisation"], n)
    distances = att.distances
    folder = Path(out) if out else Path(tempfile.mkdtemp(prefix="vitpipe-inspect-"))
    folder.mkdir(parents=True, exist_ok=True)
    name = ref.name and f"{ref.name} v{ref.version}" or Path(ref.uri).name
    title = f"{name}: mean attention distance, {att.images} images at {cfg.image_size[0]}x{cfg.image_size[1]} px"
    files = [write_csv(distances, folder / "mean_attention_distance.csv"),
             distance_plot({title: distances}, folder / "mean_attention_distance.png", max(cfg.image_size)),
             attention_grid(*att.shown, folder / "attention_maps.png")]
    client = MlflowClient(uri)
    run_id = log_inspection(client, ref, distances, files, att.images, cfg.image_size, experiment)
    first, last = distances[0].mean().item(), distances[-1].mean().item()
    tag_version(client, ref, {"vitpipe.inspect.mean_distance_first_layer": f"{first:.2f}",
                              "vitpipe.inspect.mean_distance_last_layer": f"{last:.2f}",
                              "vitpipe.inspect.run_id": run_id})
    report.info(f"inspect {model_uri}: mean attention distance {first:.1f} px in layer 1, {last:.1f} px in layer "
                f"{cfg.depth} (mean over heads, {att.images} images); figures in {folder}; MLflow run {run_id} at "
                f"{scrub_url(uri)}")
    return InspectResult(distances, run_id, files, att.images)


@dataclass
class AttentionSeen:
    distances: torch.Tensor
    """[layers, heads] mean attention distance in pixels, averaged over the images."""
    shown: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    """The first images [k, 3, H, W] in [0, 1], their last-layer CLS maps [k, heads, gh, gw] and rollout
    [k, gh, gw]: what the attention grid draws."""
    images: int


def measure_attention(encoder: ViTEncoder, images: str, normalisation: dict[str, list[float]], n: int = 128,
                      ) -> AttentionSeen:
    """The attention analyses of ``encoder`` (in eval mode) on the first ``n`` readable images of the shard split
    ``images``, preprocessed with ``normalisation`` at the encoder's image size."""
    cfg = encoder.cfg
    split = LabelledSplit(images, EvalTransform(cfg.image_size, normalisation["mean"], normalisation["std"]),
                          batch_size=32, limit=n)
    mean = torch.tensor(normalisation["mean"]).view(3, 1, 1)
    std = torch.tensor(normalisation["std"]).view(3, 1, 1)
    sums = torch.zeros(cfg.depth, cfg.num_heads, dtype=torch.float64)
    seen, shown = 0, None
    for batch in split:
        imgs = batch["image"]
        if imgs.numel() == 0:
            continue
        _, probs = encoder_attention(encoder, imgs)
        for layer, p in enumerate(probs):
            sums[layer] += mean_attention_distance(p, cfg.grid, cfg.patch_size, encoder.num_prefix_tokens)
        if shown is None:  # the first images: their maps for the grid
            k = min(SHOWN, imgs.shape[0])
            heads, rolled = cls_maps(probs[-1][:k], attention_rollout([p[:k] for p in probs]), cfg.grid,
                                     encoder.num_prefix_tokens)
            shown = ((imgs[:k] * std + mean).clamp(0, 1), heads, rolled)
        seen += imgs.shape[0]
    if seen == 0:
        raise ValueError(f"{images}: no readable image among its first {n} samples")
    return AttentionSeen(sums / seen, shown, seen)


def write_csv(distances: torch.Tensor, path: Path) -> Path:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["layer", "head", "mean_attention_distance_px"])
        for layer, row in enumerate(distances.tolist(), start=1):
            for head, value in enumerate(row, start=1):
                out.writerow([layer, head, f"{value:.4f}"])
    return path


def log_inspection(client: MlflowClient, ref: ModelRef, distances: torch.Tensor, files: list[Path], images: int,
                   image_size: tuple[int, int], experiment: str | None) -> str:
    rid = open_model_run(client, ref, "inspect", experiment, DEFAULT_EXPERIMENT)
    now = int(time.time() * 1000)
    metrics = [Metric("mean_attention_distance_px", v, now, layer)  # one point per layer: a curve by depth
               for layer, v in enumerate(distances.mean(dim=1).tolist(), start=1)]
    params = [Param("inspect.images", str(images)), Param("inspect.image_size", str(list(image_size)))]
    client.log_batch(rid, metrics=metrics, params=params)
    for path in files:
        client.log_artifact(rid, str(path), artifact_path="inspect")
    client.set_terminated(rid)
    return rid
