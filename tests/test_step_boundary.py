"""StepBoundary in a real Lightning fit: once per optimizer step, at its last micro-batch, and not again at the
step a resumed fit starts from."""

from __future__ import annotations

import lightning as L
import torch

from pipeline.step_boundary import StepBoundary


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Record(L.Callback):
    def __init__(self):
        self.boundary = StepBoundary()
        self.seen: list[tuple[int, bool]] = []  # (global step after the micro-batch, crossed)

    def on_train_start(self, trainer, pl_module):
        self.boundary.start(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((trainer.global_step, self.boundary.crossed(trainer)))


def _fit(tmp_path, max_steps: int, ckpt: str | None = None) -> tuple[Record, L.Trainer]:
    record = Record()
    trainer = L.Trainer(max_steps=max_steps, accumulate_grad_batches=3, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[record], enable_checkpointing=False)
    data = torch.utils.data.DataLoader(torch.randn(60, 2), batch_size=2)
    trainer.fit(Tiny(), data, ckpt_path=ckpt)
    return record, trainer


def test_crossed_once_per_step_at_its_last_micro_batch(tmp_path):
    record, _ = _fit(tmp_path, max_steps=3)
    assert record.seen == [(0, False), (0, False), (1, True), (1, False), (1, False), (2, True),
                           (2, False), (2, False), (3, True)]


def test_a_resumed_fit_starts_inside_its_first_step(tmp_path):
    _, trainer = _fit(tmp_path, max_steps=2)
    trainer.save_checkpoint(tmp_path / "at2.ckpt")
    record, _ = _fit(tmp_path, max_steps=3, ckpt=str(tmp_path / "at2.ckpt"))
    assert record.seen == [(2, False), (2, False), (3, True)]
