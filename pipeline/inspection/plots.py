"""Figures of an inspection: mean attention distance by layer (the ViT paper's Fig. 11) and attention maps
overlaid on the images. Written with matplotlib's Agg backend (no display needed)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def distance_plot(panels: dict[str, torch.Tensor], path: Path, image_px: int) -> Path:
    """{title: distances [layers, heads] in pixels} -> one scatter per title, side by side on one pixel scale
    (e.g. a pretrained encoder beside its random init): layer on x, one dot per head, pixels on y."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), dpi=120, squeeze=False)
    for ax, (title, distances) in zip(axes[0], panels.items()):
        layers, heads = distances.shape
        for h in range(heads):
            ax.scatter(range(1, layers + 1), distances[:, h].tolist(), s=14,
                       label=f"head {h + 1}" if heads <= 16 else None)
        ax.set_xticks(range(1, layers + 1))
        ax.set_xlabel("network depth (layer)")
        ax.set_ylabel("mean attention distance (pixels)")
        ax.set_ylim(0, image_px)
        ax.set_title(title, fontsize=9)
        if heads <= 16:
            ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def attention_grid(images: torch.Tensor, heads: torch.Tensor, rollout: torch.Tensor, path: Path) -> Path:
    """images [n, 3, H, W] in [0, 1], heads [n, h, gh, gw] and rollout [n, gh, gw] in [0, 1] -> one row per
    image: the image, the rollout, then the last layer's CLS attention of each head, upsampled and overlaid."""
    plt = pyplot()
    n, h = heads.shape[:2]
    size = images.shape[-2:]
    def up(maps: torch.Tensor) -> torch.Tensor:  # [n, gh, gw] -> [n, H, W]
        return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]

    rolled, per_head = up(rollout), [up(heads[:, i]) for i in range(h)]
    cols = 2 + h
    fig, axes = plt.subplots(n, cols, figsize=(1.3 * cols, 1.3 * n), dpi=110, squeeze=False)
    for r in range(n):
        img = images[r].permute(1, 2, 0).clamp(0, 1).numpy()
        panels = [(None, "image"), (rolled[r], "rollout")] + [(per_head[i][r], f"head {i + 1}") for i in range(h)]
        for c, (overlay, name) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(img)
            if overlay is not None:
                ax.imshow(overlay.numpy(), cmap="jet", alpha=0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=7)
    fig.tight_layout(pad=0.2)
    fig.savefig(path)
    plt.close(fig)
    return path
