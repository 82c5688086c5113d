"""One LightningModule per objective; each owns its loss, metrics, optimizer and schedule. Their configs live
in ``tasks.config``, which imports no torch."""
from .._lazy import lazy_exports

_WHERE = {"Schedule": ".base", "StreamTask": ".base", "FinetuneConfig": ".config", "FinetuneTask": ".finetune",
          "MixupConfig": ".config", "MAEPretrainTask": ".mae", "FinetuneOptimConfig": ".config",
          "OptimConfig": ".config"}
__getattr__ = lazy_exports(__name__, _WHERE)
__all__ = sorted(_WHERE)
