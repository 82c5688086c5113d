"""An exponential moving average of the model's weights (DeiT's optional ``model_ema``), kept as fp32
tensors beside the model, updated after each optimizer step, saved with every checkpoint (a resume continues
the same average) and evaluated at the end of the run."""
from __future__ import annotations

from typing import Any

import lightning as L
import torch

from ..guard import step_applied
from ..step_boundary import StepBoundary

STATE_KEY = "WeightEMA"


class WeightEMA(L.Callback):
    """shadow <- decay * shadow + (1 - decay) * weights, for every floating tensor of ``task.model``'s state
    (parameters and buffers), after every optimizer step."""

    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay {decay} is not in (0, 1)")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] | None = None
        self.boundary = StepBoundary()  # its step: the global step the shadow includes

    @property
    def state_key(self) -> str:
        return STATE_KEY

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(trainer.strategy, "zero_stage_3", False):
            raise ValueError("model.ema_decay: the weight average needs whole weights on every rank; "
                             "ZeRO-3 partitions them (use zero.stage 1 or 2)")
        current = self._weights(pl_module)
        if self.shadow is None:  # a fresh run (a resume has loaded the saved average already)
            self.shadow = {k: v.detach().float().clone() for k, v in current.items()}
            self.boundary.start(trainer)
        else:
            self.shadow = {k: v.to(current[k].device) for k, v in self.shadow.items()}

    @staticmethod
    def _weights(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v for k, v in pl_module.model.state_dict().items()
                if isinstance(v, torch.Tensor) and torch.is_floating_point(v)}

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.boundary.crossed(trainer):  # an accumulation micro-batch: the weights did not change
            return
        # A step the guard skipped leaves the average bitwise as it was: weight 0, decided on the device.
        applied = step_applied(trainer)
        weight = 1.0 - self.decay if applied is None else applied * (1.0 - self.decay)
        # One fused update over all tensors: a ViT-B has ~150 of them, each a kernel or two when done one by one.
        current = self._weights(pl_module)
        torch._foreach_lerp_([self.shadow[k] for k in current], [v.detach().float() for v in current.values()],
                             weight)

    def state_dict(self) -> dict[str, Any]:
        shadow = {k: v.cpu() for k, v in (self.shadow or {}).items()}
        return {"decay": self.decay, "step": self.boundary.step, "shadow": shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow, self.boundary.step = state["shadow"], state["step"]
