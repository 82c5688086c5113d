"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018, as used by DINO).

Each test feature finds its ``k`` most cosine-similar training features; every neighbour votes for its
label with weight ``exp(sim / T)``, so a very close neighbour outweighs several distant ones. No
parameters are trained, which makes kNN a cheap, hyper-parameter-light probe of representation quality.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import KNNConfig

# Float32 elements held per chunk of test rows: 2**26 = 256 MiB. A test row holds N similarities plus
# its k gathered features (k * D) and one-hot votes (k * C): 67 rows per chunk at N = 1e6, thousands
# when N is small. Selection masks add 1 byte per similarity.
CHUNK_ELEMS = 2**26


def nearest_indices(sims: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices [m, k] of the ``k`` largest similarities per row of sims [m, N], ascending.

    ``torch.topk`` leaves ties unspecified, so rows where the k-th value is shared beyond the top-k are
    redone with the rule "among equal similarities the lower training index wins". Returning indices in
    ascending order makes the vote sum run in the same order however the neighbours were found.
    """
    vals, idx = sims.topk(k, dim=1)  # [m, k]
    kth = vals[:, -1:]  # [m, 1]
    tied = (sims >= kth).sum(1) > k  # [m]: more candidates than slots at the boundary
    if tied.any():
        rows, kth_t = sims[tied], kth[tied]  # [t, N], [t, 1]
        keep = rows > kth_t
        equal = rows == kth_t
        slots = k - keep.sum(1, keepdim=True)  # [t, 1] slots left for the tied values
        keep |= equal & (equal.cumsum(1, dtype=torch.int32) <= slots)
        idx[tied] = keep.nonzero()[:, 1].view(-1, k)  # exactly k per row; nonzero is row-major
    return idx.sort(dim=1).values


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    cfg: KNNConfig | None = None,
) -> torch.Tensor:
    """Class scores [M, C]: per class, the sum of exp(sim / T) over the test row's k nearest neighbours.

    train_feats: [N, D], train_labels: [N] int64 in [0, C), test_feats: [M, D]. Features need not be
    normalised (cosine similarity is used). Runs on the features' device, in float32.
    """
    cfg = cfg or KNNConfig()
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"expected [N, D] and [M, D] features, got {tuple(train_feats.shape)} "
                         f"and {tuple(test_feats.shape)}")
    if train_labels.shape != (train_feats.shape[0],) or train_feats.shape[0] == 0:
        raise ValueError(f"expected {train_feats.shape[0]} > 0 labels, got shape {tuple(train_labels.shape)}")
    if train_labels.min() < 0 or train_labels.max() >= num_classes:
        raise ValueError(f"train_labels must lie in [0, {num_classes})")
    n, dim = train_feats.shape
    k = min(cfg.k, n)
    train_n = F.normalize(train_feats.float(), dim=1)  # [N, D], unit rows
    test_n = F.normalize(test_feats.float(), dim=1)  # [M, D]
    labels = train_labels.to(train_n.device, torch.long)
    rows = cfg.chunk_rows or max(1, CHUNK_ELEMS // (n + k * (dim + num_classes)))
    chunks = []
    for q in test_n.split(rows):  # q: [r, D]
        idx = nearest_indices(q @ train_n.T, k)  # [r, k]; the [r, N] product only ranks neighbours
        # Per-pair dot products for the weights: the product above may round differently with the BLAS
        # kernel picked for r rows (MKL does below 12); these do not, so chunking leaves scores bitwise
        # unchanged.
        sims = (q.unsqueeze(1) * train_n[idx]).sum(-1)  # [r, k]
        weights = (sims / cfg.temperature).exp()  # [r, k]
        votes = q.new_zeros(*idx.shape, num_classes).scatter_(2, labels[idx, None], weights[..., None])
        chunks.append(votes.sum(1))  # [r, k, C] one-hot votes -> [r, C]; scatter_add is atomic on GPU
    return torch.cat(chunks) if chunks else torch.zeros(0, num_classes, device=train_n.device)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    cfg: KNNConfig | None = None,
) -> float:
    """Top-1 accuracy in [0, 1] of the weighted kNN classifier; score ties go to the lower class id."""
    scores = knn_predict(train_feats, train_labels, test_feats, num_classes, cfg)
    pred = scores.argmax(dim=1)  # [M]; argmax returns the first maximum
    return (pred == test_labels.to(pred.device)).float().mean().item()
