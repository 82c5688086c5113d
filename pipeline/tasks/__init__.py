"""One LightningModule per objective; each owns its loss, metrics, optimizer and schedule."""
from .base import Schedule, StreamTask
from .finetune import FinetuneConfig, FinetuneTask
from .mixing import MixupConfig
from .mae import MAEPretrainTask
from .optim import FinetuneOptimConfig, OptimConfig

__all__ = ["FinetuneConfig", "FinetuneOptimConfig", "FinetuneTask", "MAEPretrainTask", "MixupConfig",
           "OptimConfig", "Schedule", "StreamTask"]
