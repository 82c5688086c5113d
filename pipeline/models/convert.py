"""Weights in and out in the formats people have: timm ViTs, released MAE and DeiT checkpoints.

Our encoder's parameters are named like timm's VisionTransformer except the position table, which lives at
``pos_embed.table`` ([1, 1 + N, D], learned) or is a fixed non-persistent buffer (sincos2d). Export is a
rename (the fixed table written out as timm's ``pos_embed``, CLS row zero, as MAE's checkpoints do). Import
reads a local file, infers the architecture from the shapes, checks every key and loads strictly.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..config import IMAGENET_NORMALISATION
from .config import VIT_SIZES, DecoderConfig, MAEConfig, ViTConfig, grid_of
from .mae import MAE
from .pos_embed import sincos_2d
from .state_file import check_keys, read_state_dict, shapes
from .vit import ViTEncoder

# The input normalisation timm, MAE and DeiT checkpoints were trained with; callers record it on export.
LAYER_SCALE_INIT = 1e-5  # recorded when a file has LayerScale: the value only matters for a fresh init
TABLE_ATOL = 1e-4  # a stored table "is" the sin-cos one within float32 rounding of its computation


@dataclass
class ImportReport:
    """What an import read, as what, and what it left out; ``meta()`` is the export's ``source`` entry."""

    source: str
    format: str  # timm, mae or deit
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sha256: str = ""

    def meta(self) -> dict[str, Any]:
        return asdict(self)


# -- export ---------------------------------------------------------------------------------------------
def timm_kwargs(encoder: ViTEncoder) -> dict[str, Any]:
    """Arguments of ``timm.models.vision_transformer.VisionTransformer`` that build ``encoder``'s network
    without a head: its ``forward_features(x)`` then equals ``encoder(x)``. ValueError for rope2d."""
    cfg = encoder.cfg
    if cfg.pos_embed == "rope2d":
        raise ValueError("rope2d position embeddings have no vanilla timm VisionTransformer equivalent; "
                         "only learned and sincos2d encoders export to timm")
    return {"img_size": tuple(cfg.image_size), "patch_size": cfg.patch_size, "in_chans": cfg.in_chans,
            "num_classes": 0, "global_pool": "token", "class_token": True, "embed_dim": cfg.embed_dim,
            "depth": cfg.depth, "num_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_ratio,
            "qkv_bias": cfg.qkv_bias, "init_values": cfg.layer_scale}


def to_timm_state_dict(encoder: ViTEncoder) -> dict[str, Tensor]:
    """Our encoder -> state dict that ``VisionTransformer(**timm_kwargs(encoder))`` loads with strict=True.
    The position table becomes ``pos_embed`` [1, 1 + N, D]; a fixed sin-cos one is written out too."""
    timm_kwargs(encoder)  # refuses rope2d
    sd = {k: v for k, v in encoder.state_dict().items() if not k.startswith("pos_embed.")}
    sd["pos_embed"] = encoder.pos_embed.table  # learned parameter or sin-cos buffer (CLS row zero)
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def write_timm(out: str | Path, encoder: ViTEncoder) -> Path:
    """Write ``<out>/timm.safetensors`` (``timm_kwargs`` as JSON in the file's metadata); returns its path."""
    path = Path(out) / "timm.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = json.dumps(timm_kwargs(encoder))
    save_file(to_timm_state_dict(encoder), str(path), metadata={"timm_kwargs": kwargs})
    return path


# -- import ---------------------------------------------------------------------------------------------
def _depth(keys: Iterable[str], stack: str) -> int:
    """Number of blocks in ``stack`` (``blocks``, ``decoder_blocks``): 1 + the highest index in the keys."""
    return 1 + max(int(m.group(1)) for k in keys if (m := re.match(rf"{stack}\.(\d+)\.", k)))


def _swap_halves(t: Tensor) -> Tensor:
    """[..., D] -> the two channel halves swapped: MAE's sin-cos order (x first) <-> ours (y first)."""
    h = t.shape[-1] // 2
    return torch.cat([t[..., h:], t[..., :h]], dim=-1)


def _position_table(sd: dict[str, Tensor], path: str, patch: int, image_size: tuple[int, int] | None,
                    report: ImportReport) -> tuple[Tensor, tuple[int, int], str]:
    """The stored ``pos_embed`` [1, R, D] as our table [1, 1 + gh*gw, D] (CLS row first), its grid and kind.
    R is 1 + N (timm, MAE), 2 + N (DeiT: CLS, distillation) or N (no_embed_class: the CLS row becomes 0).
    The kind is sincos2d when the table is our fixed one (CLS row zero), else learned (kept as stored)."""
    pos = sd["pos_embed"]
    rows, prefix = pos.shape[1], 2 if "dist_token" in sd else 1
    if image_size is not None:
        grid = grid_of(tuple(image_size), patch)
    else:  # a square grid; 1 + N is never a square, so a square R means no prefix rows
        sides = [s for n in (rows - prefix, rows) if n > 0 and (s := math.isqrt(n)) ** 2 == n]
        if not sides:
            raise ValueError(f"{path}: pos_embed has {rows} rows, not {prefix} prefix row(s) + a square "
                             "grid; pass image_size for a non-square grid")
        grid = (sides[0], sides[0])
    n = grid[0] * grid[1]
    if rows == prefix + n:
        cls = pos[:, :1]
    elif rows == n:
        cls = torch.zeros_like(pos[:, :1])
        report.notes.append("pos_embed has no class-token row (no_embed_class, as DeiT III): CLS position 0"
                            + ("" if image_size else "; a non-square grid looks the same: pass image_size"))
    else:
        raise ValueError(f"{path}: pos_embed has {rows} rows; a {grid[0]}x{grid[1]} grid needs "
                         f"{n} + {prefix}")
    if prefix == 2:
        report.notes.append("distillation token (dist_token) and its position row dropped")
    table = torch.cat([cls, pos[:, rows - n:]], dim=1)
    if pos.shape[-1] % 4 or cls.abs().max() > 0:
        return table, grid, "learned"
    ours, patches = sincos_2d(pos.shape[-1], grid), table[0, 1:].float()  # [N, D]
    if torch.allclose(patches, ours, atol=TABLE_ATOL, rtol=0):
        return table, grid, "sincos2d"
    if torch.allclose(patches, _swap_halves(ours), atol=TABLE_ATOL, rtol=0):
        report.notes.append("pos_embed is MAE's fixed sin-cos table, whose channels put x before y (ours: y "
                            "before x): kept as a learned table so the features are unchanged")
    return table, grid, "learned"


def _import_encoder(sd: dict[str, Tensor], path: str, num_heads: int | None,
                    image_size: tuple[int, int] | None) -> tuple[ViTEncoder, ImportReport, dict[str, Tensor]]:
    """Flat state dict -> (our encoder, report, the MAE decoder's tensors left over)."""
    decoder = {k: v for k, v in sd.items() if k.startswith("decoder_") or k == "mask_token"}
    heads = {k for k in sd if k.startswith(("head.", "head_dist."))  # classifiers, and the norm of their
             or (k.startswith("fc_norm.") and "norm.weight" in sd)}  # pooled input beside the token norm
    fmt = "deit" if "dist_token" in sd else "mae" if decoder else "timm"
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    report = ImportReport(path, fmt, sorted(heads | set(decoder)), sha256=sha)
    enc = {k: v for k, v in sd.items() if k not in heads and k not in decoder and k != "dist_token"}
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in enc:
            raise ValueError(f"{path}: missing key {key!r}: not a ViT state dict")
    dim, in_chans, patch, patch_w = enc["patch_embed.proj.weight"].shape  # conv [D, C, p, p]
    if patch != patch_w:
        raise ValueError(f"{path}: non-square {patch}x{patch_w} patches are not supported")
    depth = _depth(enc, "blocks")
    table, grid, kind = _position_table(sd, path, patch, image_size, report)
    if num_heads is None:
        widths = {d: h for d, _, h in VIT_SIZES.values()}
        if dim not in widths:
            raise ValueError(f"{path}: embed_dim {dim} is no standard ViT width {sorted(widths)}: "
                             "pass num_heads")
        num_heads = widths[dim]
    size = min(VIT_SIZES, key=lambda s: (abs(VIT_SIZES[s][0] - dim), abs(VIT_SIZES[s][1] - depth)))
    cfg = ViTConfig(size=size, image_size=(grid[0] * patch, grid[1] * patch), patch_size=patch,
                    in_chans=in_chans, pos_embed=kind,
                    layer_scale=LAYER_SCALE_INIT if "blocks.0.ls1.gamma" in enc else None, embed_dim=dim,
                    depth=depth, num_heads=num_heads, mlp_ratio=enc["blocks.0.mlp.fc1.weight"].shape[0] / dim,
                    qkv_bias="blocks.0.attn.qkv.bias" in enc)
    encoder = ViTEncoder(cfg)
    del enc["pos_embed"]
    if cfg.pos_embed == "learned":
        enc["pos_embed.table"] = table
    check_keys(path, enc, shapes(encoder))
    encoder.load_state_dict({**enc, "pos_embed._extra_state": encoder.pos_embed.meta()})
    return encoder, report, decoder


def import_encoder(path: str | Path, num_heads: int | None = None,
                   image_size: tuple[int, int] | None = None) -> tuple[ViTEncoder, ImportReport]:
    """A timm ViT, released MAE or DeiT checkpoint (a file ``read_state_dict`` reads) -> our encoder, report.

    Width, depth, patch size, channels, MLP ratio, qkv bias and LayerScale come from the weights; the grid
    from the position table (square unless ``image_size`` is given); heads from ``VIT_SIZES`` by width
    unless ``num_heads`` is given. Heads, fc_norm (beside norm), a MAE decoder and DeiT's distillation
    token are dropped and reported; any other unexpected or missing key or wrong shape is a ValueError."""
    encoder, report, _ = _import_encoder(read_state_dict(path), str(path), num_heads, image_size)
    return encoder, report


# Decoder tensors whose rows (first axis) / last axis index the decoder's residual channels.
_ROWS = re.compile(r"decoder_embed\.|decoder_norm\.|decoder_blocks\.\d+\.(norm1|norm2|attn\.proj|mlp\.fc2)\.")
_COLS = re.compile(r"mask_token$|decoder_pred\.weight$|decoder_blocks\.\d+\.(attn\.qkv|mlp\.fc1)\.weight$")


def _permute_residual(dec: dict[str, Tensor], perm: Tensor) -> dict[str, Tensor]:
    """Reorder the decoder's residual channels by ``perm``: an exact reparametrisation, since LayerNorm and
    the linear maps in and out of the residual stream commute with a channel permutation."""
    return {k: v[perm] if _ROWS.match(k) else v[..., perm] if _COLS.match(k) else v for k, v in dec.items()}


def import_mae(path: str | Path, num_heads: int | None = None, decoder_heads: int | None = None,
               image_size: tuple[int, int] | None = None, mask_ratio: float = 0.75,
               norm_pix_loss: bool = True) -> MAE:
    """A MAE checkpoint with its decoder (``decoder_embed``, ``mask_token``, ``decoder_pos_embed``,
    ``decoder_blocks.N``, ``decoder_norm``, ``decoder_pred``) -> our MAE. The encoder is read as by
    ``import_encoder``; decoder width, depth and MLP ratio come from the shapes, its heads are width // 32
    (MAE's 512 -> 16) unless ``decoder_heads`` is given. mask_ratio and norm_pix_loss are training choices
    the weights don't record."""
    path = str(path)
    encoder, _, dec = _import_encoder(read_state_dict(path), path, num_heads, image_size)
    for key in ("decoder_embed.weight", "decoder_blocks.0.mlp.fc1.weight"):
        if key not in dec:
            raise ValueError(f"{path}: missing key {key!r}: no MAE decoder in this file (use import_encoder)")
    ddim = dec["decoder_embed.weight"].shape[0]  # Linear [Dd, D]
    if not (heads := decoder_heads or ddim // 32):
        raise ValueError(f"{path}: decoder width {ddim} is under 32: pass decoder_heads")
    decoder = DecoderConfig(depth=_depth(dec, "decoder_blocks"), dim=ddim, num_heads=heads,
                            mlp_ratio=dec["decoder_blocks.0.mlp.fc1.weight"].shape[0] / ddim)
    mae = MAE(MAEConfig(encoder=encoder.cfg, decoder=decoder, mask_ratio=mask_ratio,
                        norm_pix_loss=norm_pix_loss))
    ours = mae.decoder_pos_embed.table  # [1, 1 + N, Dd]: fixed, not in our state dict
    want = {k: s for k, s in shapes(mae).items() if not k.startswith("encoder.")}
    check_keys(path, dec, {**want, "decoder_pos_embed": ours.shape} if "decoder_pos_embed" in dec else want)
    if (stored := dec.pop("decoder_pos_embed", None)) is not None:
        if torch.allclose(stored.float(), _swap_halves(ours), atol=TABLE_ATOL, rtol=0):
            # MAE's table (x before y) is ours with the channel halves swapped: swap the residual channels.
            dec = _permute_residual(dec, _swap_halves(torch.arange(ddim)))
        elif not torch.allclose(stored.float(), ours, atol=TABLE_ATOL, rtol=0):
            raise ValueError(f"{path}: decoder_pos_embed is not a fixed 2D sin-cos table; ours is fixed")
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    mae.load_state_dict({**state, **dec, "decoder_pos_embed._extra_state": mae.decoder_pos_embed.meta()})
    return mae


__all__ = ["IMAGENET_NORMALISATION", "ImportReport", "import_encoder", "import_mae", "read_state_dict",
           "timm_kwargs", "to_timm_state_dict", "write_timm"]
