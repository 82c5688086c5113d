"""The sample trace (``trainer.sample_trace``): one JSON line per training batch with its step, loss and sample
keys, to audit what each step saw (the resume tests compare runs step by step with it).

It reads each batch's loss back to the host, a synchronisation per step on a GPU: an audit, off unless asked
for. ``step_profile`` leaves the reads made from this file out of a step's host synchronisations.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L


class SampleTrace(L.Callback):
    """Appends one JSON line per training batch: global step, loss and the sample keys it held."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if trainer.world_size > 1:  # one file per rank: ranks never interleave lines
            self.path = self.path.with_name(f"{self.path.stem}.rank{trainer.global_rank}{self.path.suffix}")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int):
        loss = outputs["loss"].item() if isinstance(outputs, dict) else float(outputs)
        record = {"step": trainer.global_step, "rank": trainer.global_rank, "epoch": trainer.current_epoch,
                  "loss": loss, "keys": list(batch.get("key", []))}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
