"""One LightningModule per objective; each owns its loss, metrics, optimizer and schedule."""
from .mae import MAEPretrainTask, Schedule
from .optim import OptimConfig

__all__ = ["MAEPretrainTask", "OptimConfig", "Schedule"]
