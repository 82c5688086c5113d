"""Monitors during pretraining: every N steps, the weighted kNN top-1 of the current encoder's CLS features on a
fixed labelled subset (the ``evaluate`` code) and RankMe, logged as ``monitor/knn_top1`` and
``monitor/rankme``.

RankMe (Garrido et al., 2023) is exp of the entropy of the normalised singular values of a batch of features:
an effective rank, high when the features use many directions, and falling when a representation collapses.
Every rank runs the same forward batches (the subset is the same everywhere), so a sharded model (ZeRO-3)
gathers its weights in step; rank 0 logs. The subset is fixed, so a resumed run continues the same curve."""
from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch

from ..distributed.zero3_trace import outside_the_trace
from ..step_boundary import StepBoundary
from .config import MonitorConfig
from .features import EvalTransform, LabelledSplit
from .knn import knn_accuracy

log = logging.getLogger(__name__)


def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """features [N, D] -> exp(entropy of the singular values normalised to sum 1), in [1, min(N, D)]."""
    s = torch.linalg.svdvals(features.double())
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


class PretrainMonitor(L.Callback):
    def __init__(self, cfg: MonitorConfig, image_size: tuple[int, int], normalisation: dict[str, list[float]]):
        self.cfg = cfg
        self.transform = EvalTransform(image_size, normalisation["mean"], normalisation["std"], crop_pct=1.0)
        self._bank: dict[str, torch.Tensor] | None = None
        self.seconds = 0.0  # spent looking, over this process's run
        self.boundary = StepBoundary()

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.boundary.start(trainer)  # a resume at a multiple of every_n_steps does not look again

    def _read(self, split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """images [N, 3, H, W] and labels [N] of the first ``limit`` readable, labelled samples of ``split``."""
        batches = [b for b in LabelledSplit(split, self.transform, batch_size=256, limit=limit) if b["image"].numel()]
        if not batches:
            raise ValueError(f"monitor: {split} has no readable, labelled sample among its first {limit}")
        return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])

    def _load(self) -> dict[str, torch.Tensor]:
        """The fixed subset, read once: images [N, 3, H, W] and labels [N] of the bank and of the queries."""
        cfg = self.cfg
        same = cfg.train == cfg.val
        images, labels = self._read(cfg.train, cfg.max_train + (cfg.max_val if same else 0))
        if same:  # one split: the bank first, the queries after it (in proportion when the split is short)
            cut = cfg.max_train
            if len(images) < cfg.max_train + cfg.max_val:
                cut = round(len(images) * cfg.max_train / (cfg.max_train + cfg.max_val))
                log.warning("monitor: %s holds %d samples, fewer than max_train + max_val (%d): %d for the kNN "
                            "bank, %d queries", cfg.train, len(images), cfg.max_train + cfg.max_val, cut,
                            len(images) - cut)
            out = {"bank": images[:cut], "bank_labels": labels[:cut], "query": images[cut:],
                   "query_labels": labels[cut:]}
        else:
            query, query_labels = self._read(cfg.val, cfg.max_val)
            out = {"bank": images, "bank_labels": labels, "query": query, "query_labels": query_labels}
        if len(out["query"]) == 0:
            raise ValueError(f"monitor: {cfg.val} has no samples after the first {cfg.max_train} for the queries")
        return out

    @torch.no_grad()
    def _features(self, encoder: torch.nn.Module, images: torch.Tensor, trainer: L.Trainer,
                  device: torch.device) -> torch.Tensor:
        # Called as a module, so under ZeRO-3 its hooks gather the encoder's own weights (CLS token) too; the
        # caller's ``outside_the_trace`` keeps what was gathered before. The images take the precision's input
        # dtype, as a training batch does (bf16 under DeepSpeed's bf16).
        convert = trainer.precision_plugin.convert_input
        feats = [encoder(convert(images[i:i + 128].to(device)))[:, 0].float().cpu()
                 for i in range(0, len(images), 128)]
        return torch.cat(feats)  # [N, D] CLS tokens

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int):
        step = trainer.global_step
        # crossed() is never true at the step training started from (0 or the resumed step): start() saw it
        if not self.boundary.crossed(trainer) or step % self.cfg.every_n_steps:
            return
        encoder = getattr(getattr(pl_module, "model", None), "encoder", None)
        if encoder is None:
            return
        start = time.perf_counter()
        if self._bank is None:
            self._bank = self._load()
        b, was_training = self._bank, encoder.training
        encoder.eval()
        try:
            with outside_the_trace(trainer.strategy):  # ZeRO-3 keeps prefetching the training steps' weights
                bank = self._features(encoder, b["bank"], trainer, pl_module.device)
                query = self._features(encoder, b["query"], trainer, pl_module.device)
        finally:
            encoder.train(was_training)
        classes = int(max(b["bank_labels"].max(), b["query_labels"].max())) + 1
        top1 = knn_accuracy(bank, b["bank_labels"], query, b["query_labels"], classes, self.cfg.knn)
        metrics = {"monitor/knn_top1": top1, "monitor/rankme": rankme(query)}
        if trainer.is_global_zero:  # straight to the loggers: a monitor step need not be a logging step
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        self.seconds += time.perf_counter() - start

    def summary(self, fit_seconds: float) -> str | None:
        if not self.seconds or fit_seconds <= 0:
            return None
        return (f"monitors: {self.seconds:.1f} s, {self.seconds / fit_seconds:.1%} of the training time "
                f"(kNN top-1 and RankMe every {self.cfg.every_n_steps} steps; monitor/* in MLflow)")
