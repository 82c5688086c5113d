"""DeiT's losses: the label term on the CLS head and a distillation term on the distillation head.

    loss = (1 - alpha) * CE(cls_logits, target) + alpha * D(dist_logits, teacher_logits)

``hard``: D = CE(dist_logits, argmax teacher) (DeiT's default, alpha 0.5). ``soft``: D = tau^2 * KL(teacher_tau
|| student_tau), the KL between the temperature-softened distributions, averaged over the batch (Hinton's
normalisation; DeiT's code divides the summed KL by batch x classes instead, i.e. its alpha is this one's
times the number of classes). ``none``: no teacher; both heads learn from the target, averaged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import DistillConfig
from .mixing import label_loss


def distillation_loss(cls_logits: torch.Tensor, dist_logits: torch.Tensor, target: torch.Tensor,
                      teacher_logits: torch.Tensor | None, cfg: DistillConfig,
                      label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """{"loss", "label", "distill"}: the total and its two terms (unweighted). Logits [B, K]; the teacher's are
    taken as constants."""
    base = label_loss(cls_logits, target, label_smoothing)
    if cfg.kind == "none":
        other = label_loss(dist_logits, target, label_smoothing)
        return {"loss": (base + other) / 2, "label": base, "distill": other}
    if teacher_logits is None:
        raise ValueError(f"{cfg.kind} distillation needs the teacher's logits")
    teacher_logits, dist_logits = teacher_logits.detach().float(), dist_logits.float()  # softmaxes in fp32
    if cfg.kind == "hard":
        distill = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))
    else:
        t = cfg.tau
        # KL(p_teacher || p_student) per sample, summed over classes, then averaged over the batch
        distill = F.kl_div(F.log_softmax(dist_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                           reduction="batchmean", log_target=True) * (t * t)
    return {"loss": (1 - cfg.alpha) * base + cfg.alpha * distill, "label": base, "distill": distill}
