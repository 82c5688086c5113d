"""LightningDataModule over a shard manifest; its state (the stream position) goes into checkpoints."""
from __future__ import annotations

from typing import Any

import lightning as L
import torch

from .bad_samples import without_samples
from .config import StreamConfig
from .device_decode import decode_batch
from .manifest import Manifest, load_manifest
from .stream import ShardStream, StreamLoader
from .transforms import TrainTransform


class ShardDataModule(L.LightningDataModule):
    """``labelled``: the task learns from labels, so samples without a usable one (in [0, ``num_classes``)
    when given) are skipped and counted as bad; an unlabelled task (MAE) takes every decodable sample."""

    def __init__(self, cfg: StreamConfig, batch_size: int, seed: int, labelled: bool = False,
                 num_classes: int | None = None):
        super().__init__()
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.labelled, self.num_classes = labelled, num_classes
        self.manifest: Manifest = load_manifest(cfg.train)
        self.loader: StreamLoader | None = None
        self.transform = TrainTransform(cfg.transform)  # its device half: decode (gpu), standardise, erase
        self._pending_state: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        if self.loader is not None:
            return
        m = self.manifest
        ds = ShardStream(m.shard_urls(), [s.num_samples for s in m.shards], self.cfg, self.batch_size, self.seed,
                         self.labelled, self.num_classes, m.offsets_urls())
        ds.rank, ds.world_size = self.trainer.global_rank, self.trainer.world_size
        if ds.steps(0, 0) == 0:
            raise ValueError(f"{m.location}: {m.num_samples} samples are fewer than one batch of "
                             f"{self.batch_size} on each of {ds.world_size} ranks")
        self.loader = StreamLoader(ds, self.cfg.num_workers, epoch_fn=lambda: self.trainer.current_epoch,
                                   pin_memory=self.trainer.strategy.root_device.type == "cuda")
        if self._pending_state is not None:
            self.loader.load_state_dict(self._pending_state)

    def train_dataloader(self) -> StreamLoader:
        return self.loader

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """uint8 images (a quarter of float32's bytes through the loader's queues and the host-to-device copy)
        -> fp32 standardised on the training device, random erasing painted there."""
        if "encoded" in batch:  # data.decode: gpu
            images, failed = decode_batch(batch, self.transform)
            batch = without_samples({**batch, "image": images}, failed)
            for name in ("encoded", "box", "flip"):
                del batch[name]
        if batch["image"].dtype == torch.uint8:
            batch["image"] = self.transform.finish(batch["image"], batch.pop("erase", None))
            # Lightning casts a batch to the precision's input dtype before this hook, when the images were
            # still uint8: cast the floats now (bf16 under DeepSpeed's bf16, whose weights are bf16; autocast
            # and fp32 leave them as they are).
            trainer = getattr(self, "trainer", None)
            if trainer is not None:
                batch["image"] = trainer.precision_plugin.convert_input(batch["image"])
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.loader.state_dict()} if self.loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "stream" not in state:
            return
        self._pending_state = state["stream"]
        if self.loader is not None:
            self.loader.load_state_dict(state["stream"])
