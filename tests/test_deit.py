"""DeiT: the distilled ViT's tokens and heads, the distillation losses against values worked by hand, and
mixup / cutmix label weights against the pixels actually mixed."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.exports.vit import encoder_config
from pipeline.models.config import ViTConfig
from pipeline.models.deit import DistilledViT
from pipeline.models.vit import ViTEncoder
from pipeline.tasks.config import DistillConfig, MixupConfig
from pipeline.tasks.distill import distillation_loss
from pipeline.tasks.mixing import build_mixup, mix


def tiny(pos_embed: str = "learned", **kw) -> ViTEncoder:
    return ViTEncoder(ViTConfig(size="tiny", embed_dim=32, depth=2, num_heads=4, image_size=(16, 24), patch_size=4,
                                pos_embed=pos_embed, distill_token=True, **kw))


@pytest.mark.parametrize("pos_embed", ["learned", "sincos2d", "rope2d"])
def test_two_prefix_tokens_and_two_heads(pos_embed):
    torch.manual_seed(0)
    enc = tiny(pos_embed)
    model = DistilledViT(enc, num_classes=5).eval()
    imgs = torch.randn(3, 3, 16, 24)
    tokens = enc(imgs)
    assert enc.num_prefix_tokens == 2 and tokens.shape == (3, 2 + 4 * 6, 32)
    assert enc.dist_token.shape == enc.cls_token.shape == (1, 1, 32)
    meta = enc.meta()
    assert meta["distill_token"] is True and meta["pos_embed"]["num_prefix_tokens"] == 2
    if pos_embed != "rope2d":  # one position row per prefix token, then the patches
        assert enc.pos_embed.table.shape == (1, 2 + 24, 32)
    cls, dist = model.both_logits(imgs)
    assert cls.shape == dist.shape == (3, 5)
    torch.testing.assert_close(cls, model.head(tokens[:, 0]))
    torch.testing.assert_close(dist, model.head_dist(tokens[:, 1]))
    torch.testing.assert_close(model(imgs), (cls + dist) / 2)
    model.head_mode = "dist"
    torch.testing.assert_close(model(imgs), dist)
    # the two tokens are different inputs: swapping them changes the outputs
    with torch.no_grad():
        enc.cls_token, enc.dist_token = enc.dist_token, enc.cls_token
    assert not torch.allclose(model.both_logits(imgs)[0], cls)


def test_metadata_rebuilds_the_encoder_and_resamples_both_prefix_rows():
    torch.manual_seed(1)
    enc = tiny()
    bigger = ViTEncoder(encoder_config(enc.meta(), image_size=(32, 32)))
    assert bigger.num_prefix_tokens == 2
    state = enc.state_dict()
    bigger.load_state_dict(state)  # the 4x6 grid resampled to 8x8, prefix rows kept
    torch.testing.assert_close(bigger.pos_embed.table[:, :2], enc.pos_embed.table[:, :2])
    assert bigger(torch.randn(1, 3, 32, 32)).shape == (1, 2 + 64, 32)
    with pytest.raises(ValueError, match="distill_token"):
        DistilledViT(ViTEncoder(ViTConfig(size="tiny", depth=1, image_size=(16, 16), patch_size=4)), 3)


# Two samples, three classes.
CLS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
DIST = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
TEACHER = torch.tensor([[0.0, 4.0, 1.0], [1.0, 0.0, 2.0]])  # argmax: 1, 2
LABELS = torch.tensor([0, 1])


def _ce(logits: list[float], k: int) -> float:
    return -logits[k] + math.log(sum(math.exp(v) for v in logits))


def _softmax(logits: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in logits]
    return [v / sum(e) for v in e]


def test_hard_distillation_by_hand():
    label = (_ce([2, 0, -1], 0) + _ce([0.5, 1.5, 0], 1)) / 2
    hard = (_ce([1, 1, 0], 1) + _ce([0, 0, 3], 2)) / 2
    out = distillation_loss(CLS, DIST, LABELS, TEACHER, DistillConfig("hard", alpha=0.5))
    assert out["label"].item() == pytest.approx(label, rel=1e-6)
    assert out["distill"].item() == pytest.approx(hard, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.5 * label + 0.5 * hard, rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_distillation_by_hand(tau):
    kl = 0.0
    for s, t in zip(DIST.tolist(), TEACHER.tolist()):
        p, q = _softmax(t, tau), _softmax(s, tau)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    soft = kl / 2 * tau * tau
    label = (_ce([2, 0, -1], 0) + _ce([0.5, 1.5, 0], 1)) / 2
    out = distillation_loss(CLS, DIST, LABELS, TEACHER, DistillConfig("soft", alpha=0.1, tau=tau))
    assert out["distill"].item() == pytest.approx(soft, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.9 * label + 0.1 * soft, rel=1e-5)


def test_soft_targets_and_no_teacher():
    target = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]])  # e.g. after mixup
    want = -(0.7 * math.log(_softmax([2, 0, -1], 1)[0]) + 0.3 * math.log(_softmax([2, 0, -1], 1)[1])
             + 0.4 * math.log(_softmax([0.5, 1.5, 0], 1)[1]) + 0.6 * math.log(_softmax([0.5, 1.5, 0], 1)[2])) / 2
    out = distillation_loss(CLS, DIST, target, None, DistillConfig("none"))
    assert out["label"].item() == pytest.approx(want, rel=1e-6)
    assert out["loss"].item() == pytest.approx((out["label"] + out["distill"]).item() / 2, rel=1e-6)
    with pytest.raises(ValueError, match="teacher"):
        distillation_loss(CLS, DIST, LABELS, None, DistillConfig("hard"))
    teacher = TEACHER.clone().requires_grad_()
    distillation_loss(CLS, DIST.clone().requires_grad_(), LABELS, teacher, DistillConfig("soft"))["loss"].backward()
    assert teacher.grad is None  # the teacher is a constant


def _batch(b: int = 8, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is the constant i (every pixel, every channel); label i: each pixel tells whose it is. Seeds
    the generators timm's Mixup draws from (numpy for lambda and box, torch for nothing else here)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    imgs = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, size, size).clone()
    return imgs, torch.arange(b)


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_weighs_labels_by_the_pasted_area(seed):
    imgs, labels = _batch(seed=seed)
    mixed, target = mix(build_mixup(MixupConfig(mixup_alpha=0.0, cutmix_alpha=1.0), 8, 0.0), imgs, labels)
    for i in range(8):
        partner = 7 - i  # timm pairs sample i with the batch's mirror image
        area = (mixed[i, 0] == partner).float().mean().item()
        assert ((mixed[i, 0] == i) | (mixed[i, 0] == partner)).all()
        assert target[i, partner].item() == pytest.approx(area, abs=1e-6)
        assert target[i, i].item() == pytest.approx(1 - area, abs=1e-6)
        assert target[i].sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(3))
def test_mixup_weighs_labels_by_the_blend(seed):
    imgs, labels = _batch(seed=seed)
    mixed, target = mix(build_mixup(MixupConfig(mixup_alpha=0.8, cutmix_alpha=0.0), 8, 0.1), imgs, labels)
    lam = (mixed[0, 0, 0, 0].item() - 7) / (0 - 7)  # pixel = lam * 0 + (1 - lam) * 7
    off = 0.1 / 8  # label smoothing spreads 0.1 over the 8 classes
    assert target[0, 0].item() == pytest.approx(lam * (1 - 0.1) + off, abs=1e-5)
    assert target[0, 7].item() == pytest.approx((1 - lam) * (1 - 0.1) + off, abs=1e-5)
    odd_imgs, odd_labels = _batch(7)
    assert mix(build_mixup(MixupConfig(), 8, 0.0), odd_imgs, odd_labels)[1].equal(odd_labels)  # odd: unmixed
