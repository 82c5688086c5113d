"""The evaluation stage: frozen features of a registered encoder -> kNN and / or linear probe accuracy,
logged to an MLflow run linked to the training run, and attached to the model version as tags."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from ..config import flatten, to_dict
from ..console import report
from ..evaluation import knn_accuracy, train_linear_probe
from ..evaluation.config import EvalConfig
from ..evaluation.features import EvalTransform, LabelledSplit, extract
from ..objectives.registry import objective_of_export
from ..registry import ModelError, ModelRef, resolve_model, tag_version
from ..tracking import TrackingConfig, resolve_uri
from ..tracking.secrets import scrub, scrub_url
from ..tracking.stores import require_store


@dataclass
class EvalResult:
    metrics: dict[str, float]
    run_id: str
    ref: ModelRef
    """The evaluated model, resolved (its files are local)."""
    transform: EvalTransform
    """The images' preprocessing it was evaluated with (for baselines measured on the same images)."""


def evaluate_embedding(embed: Callable[[torch.Tensor], torch.Tensor], cfg: EvalConfig, transform: EvalTransform,
                       ) -> dict[str, float]:
    """Accuracy of the requested protocols for one feature extractor ([b, 3, H, W] -> [b, D])."""
    t0 = time.perf_counter()
    train = extract(embed, LabelledSplit(cfg.train, transform, cfg.batch_size, cfg.max_train), cfg.num_workers)
    val = extract(embed, LabelledSplit(cfg.val, transform, cfg.batch_size, cfg.max_val), cfg.num_workers)
    seconds = time.perf_counter() - t0
    classes = max(train.num_classes, val.num_classes)
    metrics = {"train_samples": float(len(train.labels)), "val_samples": float(len(val.labels)),
               "skipped_samples": float(train.skipped + val.skipped),
               "features_per_s": (len(train.labels) + len(val.labels)) / max(seconds, 1e-9)}
    if "knn" in cfg.protocols:
        metrics["knn_top1"] = knn_accuracy(train.feats, train.labels, val.feats, val.labels, classes, cfg.knn)
    if "linear" in cfg.protocols:
        probe = train_linear_probe(train.feats, train.labels, val.feats, val.labels, classes, cfg.linear,
                                   seed=cfg.seed)
        metrics["linear_top1"], metrics["linear_train_top1"] = probe.top1, probe.train_top1
    return metrics


def evaluate_model(model_uri: str, cfg: EvalConfig, tracking: TrackingConfig,
                   experiment: str | None = None) -> EvalResult:
    """Evaluate ``model_uri``; the run goes to ``experiment``, by default the training run's experiment,
    as a child of the training run, and the metrics are tagged onto the model version."""
    # a registered model must come from a store that exists; an export folder may start a new store
    registered = model_uri.startswith("models:/")
    uri = resolve_uri(tracking, where="--tracking-uri", create=not registered)
    ref = resolve_model(model_uri, require_store(uri) if registered else uri)
    objective = objective_of_export(ref.metadata(), ref.uri)
    if objective.features is None:
        raise ModelError(f"{model_uri}: a {objective.name} model, and that objective gives no features to evaluate")
    emb = objective.features(ref, cfg)
    for note in emb.notes:
        report.info(f"evaluate {model_uri}: {note}")
    transform = EvalTransform(emb.image_size, emb.normalisation["mean"], emb.normalisation["std"], cfg.crop_pct)
    metrics = evaluate_embedding(emb.embed, cfg, transform)
    client = MlflowClient(uri)
    run_id = log_evaluation(client, ref, cfg, metrics, experiment, dict(emb.params))
    tag_version(client, ref, {f"vitpipe.eval.{k}": f"{v:.4f}" for k, v in metrics.items() if k.endswith("top1")}
                | {"vitpipe.eval.run_id": run_id})
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("top1"))
    report.info(f"evaluate {model_uri}: {shown} on {int(metrics['val_samples'])} held-out samples "
                f"({int(metrics['train_samples'])} train); MLflow run {run_id} at {scrub_url(uri)}")
    return EvalResult(metrics, run_id, ref, transform)


def open_model_run(client: MlflowClient, ref: ModelRef, task: str, experiment: str | None,
                   default_experiment: str) -> str:
    """A new run about model ``ref``: in ``experiment`` if given, else nested under the run that trained the
    model (in its experiment), else in ``default_experiment``; returns its id."""
    parent = client.get_run(ref.run_id) if ref.run_id else None
    if experiment is not None or parent is None:
        name = experiment or default_experiment
        found = client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found else client.create_experiment(name)
    else:
        experiment_id = parent.info.experiment_id
    tags = {"vitpipe.task": task, "vitpipe.model_uri": ref.uri}
    if ref.name:
        tags |= {"vitpipe.model_name": ref.name, "vitpipe.model_version": str(ref.version)}
    if parent is not None:
        tags["vitpipe.trained_by_run"] = parent.info.run_id
        if parent.info.experiment_id == experiment_id:
            tags["mlflow.parentRunId"] = parent.info.run_id  # nests the run under its training run
    return client.create_run(experiment_id, run_name=f"{task} {ref.name or ref.uri}", tags=tags).info.run_id


def log_evaluation(client: MlflowClient, ref: ModelRef, cfg: EvalConfig, metrics: dict[str, float],
                   experiment: str | None, extra_params: dict[str, str] | None = None) -> str:
    rid, now = open_model_run(client, ref, "evaluate", experiment, "vitpipe"), int(time.time() * 1000)
    params = [Param(f"eval.{k}", str(v)) for k, v in flatten(scrub(to_dict(cfg))).items()]
    params += [Param(k, v) for k, v in (extra_params or {}).items()]
    client.log_batch(rid, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()], params=params)
    client.set_terminated(rid)
    return rid
