"""Position embeddings for a ViT: learned 1D, fixed 2D sin-cos, and RoPE-2D, with resampling.

Every kind records what it was made for (kind, grid, number of prefix tokens) in the module's
``extra_state``, which travels inside the state dict. Loading weights made for another grid therefore
resamples from the *recorded* grid instead of guessing it from a sequence length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import PosEmbedKind, grid_of


def sincos_2d(dim: int, grid: tuple[int, int], temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2D sin-cos table as in MAE: [gh*gw, dim]; half the channels encode y, half x."""
    if dim % 4:
        raise ValueError(f"sin-cos 2D position embedding needs embed_dim divisible by 4, got {dim}")
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    out_y = ys.reshape(-1, 1) * omega  # [L, dim/4]
    out_x = xs.reshape(-1, 1) * omega
    return torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1).float()  # [L, dim]


def resample_grid(table: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling of a per-patch table [old_h*old_w, D] to [new_h*new_w, D] (grids may be non-square)."""
    if tuple(old) == tuple(new):
        return table
    dim = table.shape[-1]
    grid = table.reshape(1, old[0], old[1], dim).permute(0, 3, 1, 2).float()  # [1, D, h, w]
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False,
                         antialias=new[0] < old[0] or new[1] < old[1])
    return grid.permute(0, 2, 3, 1).reshape(new[0] * new[1], dim).to(table.dtype)


class PosEmbed(nn.Module):
    """Adds absolute position embeddings (learned / sin-cos) or provides RoPE tables for attention.

    ``pos_table`` covers prefix tokens then patches: [num_prefix + gh*gw, D]. For sin-cos the prefix rows
    are zeros (as in MAE); for RoPE there is no additive table and ``rope(ids)`` gives rotation tables.
    """

    def __init__(self, kind: PosEmbedKind, dim: int, grid: tuple[int, int], num_prefix_tokens: int,
                 num_heads: int, rope_theta: float = 100.0):
        super().__init__()
        self.kind, self.dim, self.grid, self.num_prefix_tokens = kind, dim, tuple(grid), num_prefix_tokens
        self.rope_theta = rope_theta
        self.head_dim = dim // num_heads
        n = num_prefix_tokens + grid[0] * grid[1]
        if kind == "learned":
            self.table = nn.Parameter(torch.zeros(1, n, dim))
            nn.init.trunc_normal_(self.table, std=0.02)
        elif kind == "sincos2d":
            table = torch.cat([torch.zeros(num_prefix_tokens, dim), sincos_2d(dim, self.grid)])
            self.register_buffer("table", table.unsqueeze(0), persistent=False)  # [1, n, D]
        elif kind == "rope2d":
            if self.head_dim % 4:
                raise ValueError(f"RoPE-2D needs head_dim divisible by 4, got {self.head_dim}")
            self.table = None
            # Positions are expressed on the grid the weights were trained on (``trained_grid``), so a model
            # run at another resolution interpolates positions rather than extrapolating them.
            self.trained_grid = self.grid
        else:
            raise ValueError(f"unknown position embedding kind {kind!r}")

    # -- additive embeddings -------------------------------------------------------------------------
    def add_to_patches(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D] patch tokens (no prefix) -> x + position table of the patches."""
        if self.table is None:
            return x
        return x + self.table[:, self.num_prefix_tokens:, :].to(x.dtype)

    def prefix(self) -> torch.Tensor | None:
        """[1, num_prefix, D] additive embedding for the prefix tokens (None for RoPE)."""
        if self.table is None:
            return None
        return self.table[:, : self.num_prefix_tokens, :]

    # -- RoPE ----------------------------------------------------------------------------------------
    def rope(self, ids: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        """Rotation angles for the kept patches: ids [B, N] (None: all patches) -> [B, 1, N, head_dim/2]."""
        if self.kind != "rope2d":
            return None
        gh, gw = self.grid
        th, tw = self.trained_grid
        ys, xs = torch.meshgrid(torch.arange(gh, device=device, dtype=torch.float32) * (th / gh),
                                torch.arange(gw, device=device, dtype=torch.float32) * (tw / gw),
                                indexing="ij")
        quarter = self.head_dim // 4
        freqs = 1.0 / self.rope_theta ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
        angles = torch.cat([ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs], dim=1)  # [L, hd/2]
        angles = angles.unsqueeze(0).expand(batch, -1, -1)
        if ids is not None:
            angles = torch.gather(angles, 1, ids.unsqueeze(-1).expand(-1, -1, angles.shape[-1]))
        return angles.unsqueeze(1)  # [B, 1, N, hd/2]

    # -- metadata travels with the weights -----------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        grid = self.trained_grid if self.kind == "rope2d" else self.grid
        return {"kind": self.kind, "grid": list(grid), "num_prefix_tokens": self.num_prefix_tokens,
                "dim": self.dim}

    def get_extra_state(self) -> dict[str, Any]:
        return self.meta()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"weights use {state['kind']} position embeddings, model is built with {self.kind}")
        if self.kind == "rope2d":
            self.trained_grid = tuple(state["grid"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        meta = state_dict.get(prefix + "_extra_state")
        key = prefix + "table"
        if self.kind == "learned" and meta is not None and key in state_dict:
            state_dict[key] = resample_table(state_dict[key], tuple(meta["grid"]), meta["num_prefix_tokens"],
                                             self.grid, self.num_prefix_tokens)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def resample_table(table: torch.Tensor, old_grid: tuple[int, int], old_prefix: int,
                   new_grid: tuple[int, int], new_prefix: int) -> torch.Tensor:
    """[1, old_prefix + oh*ow, D] -> [1, new_prefix + nh*nw, D]; prefix rows are kept (or zero-filled)."""
    expected = old_prefix + old_grid[0] * old_grid[1]
    if table.shape[1] != expected:
        raise ValueError(f"position table has {table.shape[1]} rows, metadata says {old_prefix} prefix + "
                         f"{old_grid[0]}x{old_grid[1]} grid = {expected}")
    prefix, patches = table[0, :old_prefix], table[0, old_prefix:]
    if new_prefix > old_prefix:  # e.g. a distillation token added after pretraining
        prefix = torch.cat([prefix, prefix[:1].expand(new_prefix - old_prefix, -1)]) if old_prefix else \
            torch.zeros(new_prefix, table.shape[-1], dtype=table.dtype)
    prefix = prefix[:new_prefix]
    return torch.cat([prefix, resample_grid(patches, old_grid, new_grid)]).unsqueeze(0)


# How each kind follows a change of grid (see PosEmbed._load_from_state_dict, PosEmbed.rope).
RESAMPLE_METHOD = {"learned": "bicubic interpolation of the learned table (antialiased when shrinking)",
                   "sincos2d": "sin-cos table recomputed for the new grid",
                   "rope2d": "RoPE positions rescaled onto the trained grid"}


@dataclass(frozen=True)
class GridChange:
    """A position embedding used on another patch grid than the one its weights were made for."""

    kind: str
    old: tuple[int, int]
    new: tuple[int, int]

    @property
    def method(self) -> str:
        return RESAMPLE_METHOD[self.kind]

    def __str__(self) -> str:
        return (f"{self.kind} position embedding resampled: grid {self.old[0]}x{self.old[1]} -> "
                f"{self.new[0]}x{self.new[1]}, {self.method}")


def grid_change(meta: dict[str, Any], new_grid: tuple[int, int]) -> GridChange | None:
    """The change from the grid recorded in ``meta`` (a ``PosEmbed.meta()``) to ``new_grid``; None if equal."""
    old = tuple(meta["grid"])
    return None if old == tuple(new_grid) else GridChange(meta["kind"], old, tuple(new_grid))


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + hd/2) of x [B, H, N, hd] by angles [B, 1, N, hd/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


__all__ = ["GridChange", "PosEmbed", "PosEmbedKind", "apply_rope", "grid_change", "grid_of", "resample_grid",
           "resample_table", "sincos_2d"]
