"""The task configs: optimizer and schedule, mixup / cutmix, fine-tuning, DeiT (student, distillation,
teacher) and timm classifiers. Plain dataclasses with no torch or timm import, so a recipe is checked in a
fraction of a second, before the training stack loads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import IMAGENET_NORMALISATION
from ..models.config import ViTConfig


@dataclass
class OptimConfig:
    """Optimizer and schedule. The learning rate scales with the effective (global) batch."""

    base_lr: float = 1.5e-4
    """lr = base_lr * effective_batch / 256 (the MAE paper's linear scaling rule)."""
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None
    """Overrides warmup_epochs when set."""
    min_lr: float = 0.0
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; None disables clipping."""


def supervised_optim(base_lr: float) -> OptimConfig:
    """DeiT's schedule for training on labels (AdamW betas 0.9 / 0.999, 5 warm-up epochs, lr down to 1e-5)."""
    return OptimConfig(base_lr=base_lr, betas=(0.9, 0.999), warmup_epochs=5.0, min_lr=1e-5)


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """Fine-tuning adds layer-wise lr decay; defaults are the MAE paper's ViT-B fine-tuning (Table 9)."""

    base_lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 5.0
    min_lr: float = 1e-6
    layer_decay: float = 0.65
    """lr of layer i = peak * layer_decay ** (depth + 1 - i); 1.0 disables."""


@dataclass
class MixupConfig:
    """Mixup and CutMix on each batch (timm's Mixup); both alphas 0 turn it off."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    """Chance of CutMix rather than Mixup when both are on."""


DistillKind = Literal["none", "hard", "soft"]


@dataclass
class DistillConfig:
    """How the distillation head learns."""

    kind: DistillKind = "hard"
    alpha: float = 0.5
    """Weight of the distillation term; the label term gets 1 - alpha."""
    tau: float = 1.0
    """Temperature of soft distillation."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distill.alpha {self.alpha} is not in [0, 1]")
        if self.tau <= 0:
            raise ValueError(f"distill.tau {self.tau} must be > 0")


@dataclass
class TeacherConfig:
    """Where the teacher comes from; an empty ``model`` means no teacher."""

    model: str = ""
    """models:/<name>@<alias>, models:/<name>/<version>, an export folder, or timm:<arch> with ``weights``."""
    weights: str | None = None
    """For timm:<arch>: a local safetensors or torch state-dict file (never downloaded)."""
    num_classes: int | None = None
    """For timm:<arch>: its classes (a registered teacher records them)."""
    in_chans: int = 3
    image_size: tuple[int, int] | None = None
    """For timm:<arch>: its input size (None: the student's)."""
    normalisation: dict[str, list[float]] = field(default_factory=lambda: dict(IMAGENET_NORMALISATION))
    """For timm:<arch>: the mean/std its weights expect."""

    def __post_init__(self) -> None:
        if self.model.startswith("timm:") and (not self.weights or self.num_classes is None):
            raise ValueError("teacher: timm:<arch> needs teacher.weights (a local file) and teacher.num_classes")


@dataclass
class FinetuneConfig:
    """The model being fine-tuned and its head."""

    init: str = ""
    """The pretrained encoder: models:/<name>@<alias>, models:/<name>/<version>, or an export folder."""
    from_scratch: bool = False
    """Take only the architecture of ``init`` and train it from freshly initialised weights (seeded by the
    recipe's seed): the baseline that shows what the pretraining bought, at the same recipe and steps."""
    num_classes: int = 1000
    image_size: tuple[int, int] = (224, 224)
    """Fine-tuning resolution; position embeddings are resampled when it differs from pretraining."""
    pool: Literal["avg", "cls"] = "avg"
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup: MixupConfig = field(default_factory=MixupConfig)
    eval_crop_pct: float = 0.875
    """Centre-crop fraction of the held-out evaluation at the end of the run."""
    eval_limit: int | None = None
    """Evaluate on the first this-many held-out samples (None: all)."""

    def __post_init__(self) -> None:
        if not self.init:
            raise ValueError("model.init must name the pretrained model (models:/<name>@<alias> or a folder)")
        self.image_size = tuple(self.image_size)


@dataclass
class TimmClassifierConfig:
    """A timm architecture trained from scratch (e.g. a CNN teacher for DeiT); weights are never downloaded."""

    arch: str = "resnet18"
    num_classes: int = 1000
    in_chans: int = 3
    image_size: tuple[int, int] = (224, 224)
    label_smoothing: float = 0.1
    mixup: MixupConfig = field(default_factory=MixupConfig)
    eval_crop_pct: float = 0.875
    """Centre-crop fraction of the held-out evaluation at the end of the run."""
    eval_limit: int | None = None
    """Evaluate on the first this-many held-out samples (None: all)."""

    def __post_init__(self) -> None:
        self.image_size = tuple(self.image_size)


@dataclass
class DeiTConfig:
    """The student, its heads, the teacher and the loss."""

    encoder: ViTConfig = field(default_factory=lambda: ViTConfig(size="small", pos_embed="learned",
                                                                 distill_token=True, drop_path=0.1))
    num_classes: int = 1000
    head: Literal["both", "cls", "dist"] = "both"
    """Which head predicts at evaluation: both averaged (DeiT), or one alone."""
    label_smoothing: float = 0.1
    mixup: MixupConfig = field(default_factory=MixupConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    eval_crop_pct: float = 0.875
    """Centre-crop fraction of the held-out evaluation at the end of the run."""
    eval_limit: int | None = None
    """Evaluate on the first this-many held-out samples (None: all)."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights (DeiT: 0.99996) and report its top-1 too."""

    def __post_init__(self) -> None:
        if not self.encoder.distill_token:
            raise ValueError("model.encoder.distill_token must be true for a DeiT student")
        if self.distill.kind != "none" and not self.teacher.model:
            raise ValueError(f"model.distill.kind is {self.distill.kind!r} but model.teacher.model is empty "
                             "(set a teacher, or distill.kind: none for supervised training alone)")
