"""Weighted kNN and linear probing on small hand-built feature sets (no encoder, no data files)."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.evaluation import (
    KNNConfig,
    LinearProbeConfig,
    knn_accuracy,
    knn_predict,
    linear_probe,
    train_linear_probe,
)

# Test point (1, 0): cosine 1.0 to the label-0 point, 0.8 to two label-1 points, 0.0 to a label-2 point.
TRAIN = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6], [0.0, 1.0]])
LABELS = torch.tensor([0, 1, 1, 2])
TEST = torch.tensor([[1.0, 0.0]])


def test_knn_scores_are_hand_computed_weighted_votes():
    scores = knn_predict(TRAIN, LABELS, TEST, 3, KNNConfig(k=3, temperature=0.1))
    # k = 3 drops the label-2 point; votes are exp(sim / T): e^10 for class 0, 2 e^8 for class 1.
    expected = torch.tensor([[math.exp(10.0), 2 * math.exp(8.0), 0.0]])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0.0)


def test_weighting_beats_majority_vote():
    weighted = knn_predict(TRAIN, LABELS, TEST, 3, KNNConfig(k=3, temperature=0.1))
    assert weighted.argmax(1).item() == 0  # e^10 > 2 e^8: one close neighbour outvotes two farther ones
    # With a huge temperature every vote weighs ~1 and the plain 2-vs-1 majority wins.
    flat = knn_predict(TRAIN, LABELS, TEST, 3, KNNConfig(k=3, temperature=1e6))
    assert flat.argmax(1).item() == 1
    torch.testing.assert_close(flat, torch.tensor([[1.0, 2.0, 0.0]]), rtol=1e-5, atol=1e-5)


def test_k1_returns_nearest_label():
    test = torch.tensor([[0.1, 1.0], [0.9, 0.5], [0.9, -0.5], [1.0, 0.05]])
    scores = knn_predict(TRAIN, LABELS, test, 3, KNNConfig(k=1))
    assert scores.argmax(1).tolist() == [2, 1, 1, 0]
    assert ((scores > 0).sum(1) == 1).all()  # exactly one neighbour voted
    assert knn_accuracy(TRAIN, LABELS, test, torch.tensor([2, 1, 1, 1]), 3, KNNConfig(k=1)) == 0.75


def test_cosine_ignores_feature_scale():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 8, generator=g), torch.randn(20, 8, generator=g)
    labels = torch.randint(0, 5, (50,), generator=g)
    cfg = KNNConfig(k=5)
    base = knn_predict(train, labels, test, 5, cfg)
    row_scale = torch.rand(50, 1, generator=g) * 100 + 0.01  # a positive factor per training feature
    scaled = knn_predict(train * row_scale, labels, test * 7.0, 5, cfg)
    torch.testing.assert_close(scaled, base, rtol=1e-4, atol=0.0)
    assert torch.equal(scaled.argmax(1), base.argmax(1))


def test_k_larger_than_n_uses_every_training_point():
    scores = knn_predict(TRAIN, LABELS, TEST, 3, KNNConfig(k=100, temperature=0.1))
    expected = torch.tensor([[math.exp(10.0), 2 * math.exp(8.0), 1.0]])  # the label-2 point: e^0 = 1
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0.0)


def test_chunking_matches_single_chunk():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(300, 16, generator=g), torch.randn(97, 16, generator=g)
    labels = torch.randint(0, 7, (300,), generator=g)
    whole = knn_predict(train, labels, test, 7, KNNConfig(k=10, chunk_rows=97))
    for rows in (1, 2, 5, 8, 11, 50, 96):  # MKL switches GEMM kernels below 12 rows
        assert torch.equal(knn_predict(train, labels, test, 7, KNNConfig(k=10, chunk_rows=rows)), whole)


def test_ties_go_to_lower_training_index():
    # Five copies of the same feature with labels 3, 1, 0, 2, 4: k = 2 must pick indices 0 and 1.
    train = torch.ones(5, 4)
    labels = torch.tensor([3, 1, 0, 2, 4])
    test = torch.ones(3, 4)
    for rows in (1, 3):
        scores = knn_predict(train, labels, test, 5, KNNConfig(k=2, temperature=1.0, chunk_rows=rows))
        w = math.e  # sim 1, T 1
        torch.testing.assert_close(scores, torch.tensor([[0.0, w, 0.0, w, 0.0]] * 3))
        assert scores.argmax(1).tolist() == [1, 1, 1]  # equal scores: the lower class id


@pytest.mark.parametrize("field, kwargs", [
    ("k", {"k": 0}), ("temperature", {"temperature": 0.0}), ("temperature", {"temperature": -1.0}),
    ("chunk_rows", {"chunk_rows": 0}),
])
def test_knn_config_rejects_bad_values(field, kwargs):
    with pytest.raises(ValueError, match=field):
        KNNConfig(**kwargs)


@pytest.mark.parametrize("field, kwargs", [
    ("epochs", {"epochs": 0}), ("batch_size", {"batch_size": 1}), ("base_lr", {"base_lr": -0.1}),
    ("warmup_epochs", {"warmup_epochs": -1}),
])
def test_probe_config_rejects_bad_values(field, kwargs):
    with pytest.raises(ValueError, match=field):
        LinearProbeConfig(**kwargs)


def blobs(n: int, dim: int, classes: int, seed: int, offset: float = 0.0, scale: float = 1.0):
    """Gaussian blobs: class centres at distance ~4 sqrt(2), unit noise, so classes barely overlap."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 4.0
    labels = torch.randint(0, classes, (n,), generator=g)
    feats = centres[labels] + torch.randn(n, dim, generator=g)
    return feats * scale + offset, labels


FAST = LinearProbeConfig(epochs=30)


def test_probe_separates_blobs():
    (xt, yt), (xv, yv) = blobs(1024, 32, 5, seed=0), blobs(512, 32, 5, seed=1)
    result = train_linear_probe(xt, yt, xv, yv, 5, FAST)
    assert result.top1 > 0.95 and result.train_top1 > 0.95
    assert result.epochs == 30 and not result.head.training


def test_probe_on_random_labels_is_near_chance():
    g = torch.Generator().manual_seed(2)
    xt, xv = torch.randn(512, 32, generator=g), torch.randn(2000, 32, generator=g)
    yt, yv = torch.randint(0, 10, (512,), generator=g), torch.randint(0, 10, (2000,), generator=g)
    result = train_linear_probe(xt, yt, xv, yv, 10, FAST)
    assert abs(result.top1 - 0.1) < 0.04  # 2,000 held-out labels: std of chance accuracy ~0.007
    assert result.train_top1 > result.top1 + 0.1  # it memorises some training labels, learns nothing


def test_head_is_bn_without_affine_then_linear():
    (xt, yt), (xv, yv) = blobs(256, 16, 3, seed=0), blobs(64, 16, 3, seed=1)
    head = train_linear_probe(xt, yt, xv, yv, 3, LinearProbeConfig(epochs=1)).head
    bn, linear = head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert bn.weight is None and bn.bias is None
    assert isinstance(linear, torch.nn.Linear) and linear.weight.shape == (3, 16)
    assert [n for n, _ in head.named_parameters()] == ["1.weight", "1.bias"]


def test_same_seed_same_head():
    (xt, yt), (xv, yv) = blobs(300, 16, 4, seed=0), blobs(100, 16, 4, seed=1)
    cfg = LinearProbeConfig(epochs=5, batch_size=64)
    a, b = (train_linear_probe(xt, yt, xv, yv, 4, cfg, seed=7).head for _ in range(2))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    c = train_linear_probe(xt, yt, xv, yv, 4, cfg, seed=8).head
    assert not torch.equal(a[1].weight, c[1].weight)


def test_probe_leaves_global_rng_alone():
    (xt, yt), (xv, yv) = blobs(64, 8, 2, seed=0), blobs(16, 8, 2, seed=1)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    train_linear_probe(xt, yt, xv, yv, 2, LinearProbeConfig(epochs=2))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("offset, scale", [(1e4, 1.0), (1e4, 1e3), (0.0, 1e-3)])
def test_probe_trains_on_badly_scaled_features(offset, scale):
    (xt, yt), (xv, yv) = (blobs(1024, 32, 5, seed=s, offset=offset, scale=scale) for s in (0, 1))
    result = train_linear_probe(xt, yt, xv, yv, 5, FAST)
    assert result.top1 > 0.95
    assert torch.isfinite(result.head[1].weight).all()


def test_without_bn_a_large_offset_defeats_the_probe(monkeypatch):
    # The counterfactual: a bare Linear on blobs riding on a 1e4 offset stays near chance (0.2).
    (xt, yt), (xv, yv) = (blobs(1024, 32, 5, seed=s, offset=1e4) for s in (0, 1))
    bn_head = linear_probe.build_head
    monkeypatch.setattr(linear_probe, "build_head", lambda d, c, g: torch.nn.Sequential(bn_head(d, c, g)[1]))
    assert train_linear_probe(xt, yt, xv, yv, 5, FAST).top1 < 0.5
