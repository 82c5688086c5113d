"""The ViT export folder (MAE, DeiT, fine-tuned classifiers, imported weights): write it and load it back.

``<out>/encoder.safetensors``   the ViT encoder alone (what fine-tuning and evaluation use)
``<out>/mae.safetensors``       the full MAE, decoder included
``<out>/timm.safetensors``      the encoder in timm's names, when asked (``models.convert.write_timm``)
``<out>/metadata.json``         architecture, image and patch size, position-embedding kind / grid /
                                prefix tokens, normalisation stats, recipe hash, step
Position-embedding metadata is not a tensor, so it lives in ``metadata.json`` and is handed back to the
model on load: loading at another image size resamples from the recorded grid, never a guessed one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..config import build, to_dict
from ..models import MAE, MAEConfig, ViTConfig, ViTEncoder
from ..models.classifier import ViTClassifier
from ..models.config import DecoderConfig
from ..models.deit import DistilledViT
from .files import read_metadata, save_weights, write_metadata


def write_export(out: str | Path, encoder: ViTEncoder, mae: MAE | None = None,
                 normalisation: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                 objective: str = "mae") -> Path:
    """The one writer of a ViT export folder: ``encoder.safetensors``, ``mae.safetensors`` when ``mae`` is given
    (its encoder should be ``encoder``), and ``metadata.json``.

    normalisation: {"mean": [...], "std": [...]} of the input transform (None: unknown). extra: entries
    appended to the metadata: recipe name / hash and step for a trained checkpoint, ``source`` for imports.
    objective: the objective that trained it (its features hook reads the folder for evaluation).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(encoder, out / "encoder.safetensors")
    meta: dict[str, Any] = {"encoder": encoder.meta()}
    if mae is not None:
        save_weights(mae, out / "mae.safetensors")
        meta["mae"] = {"decoder": to_dict(mae.cfg.decoder), "mask_ratio": mae.cfg.mask_ratio,
                       "norm_pix_loss": mae.cfg.norm_pix_loss, "encoder_mask_tokens": mae.cfg.encoder_mask_tokens}
    if normalisation:  # (else unknown: write_metadata records it so)
        meta["normalisation"] = normalisation
    return write_metadata(out, objective, {**meta, **(extra or {})})


def encoder_config(meta: dict[str, Any], image_size: tuple[int, int] | None = None) -> ViTConfig:
    """The architecture an export's ``encoder`` metadata describes, at ``image_size`` when given."""
    return ViTConfig(size=meta["size"], image_size=tuple(image_size or meta["image_size"]),
                     patch_size=meta["patch_size"], in_chans=meta["in_chans"], pos_embed=meta["pos_embed"]["kind"],
                     layer_scale=meta["layer_scale"], embed_dim=meta["embed_dim"], depth=meta["depth"],
                     num_heads=meta["num_heads"], mlp_ratio=meta.get("mlp_ratio", 4.0),
                     qkv_bias=meta.get("qkv_bias", True), distill_token=meta.get("distill_token", False))


def load_encoder(folder: str | Path, image_size: tuple[int, int] | None = None, fresh: bool = False) -> ViTEncoder:
    """Rebuild the exported encoder, optionally at another image size (positions are resampled).

    fresh: the same architecture with newly initialised weights (drawn from the global RNG), the files' weights
    left unread: the from-scratch baseline a pretrained encoder is measured against."""
    meta = read_metadata(folder)["encoder"]
    pos = meta["pos_embed"]
    cfg = encoder_config(meta, image_size)
    encoder = ViTEncoder(cfg)
    if not meta.get("final_norm", True):
        encoder.norm = torch.nn.Identity()
    if fresh:
        return encoder
    state = load_file(str(Path(folder) / "encoder.safetensors"))
    state["pos_embed._extra_state"] = pos  # the recorded grid drives any resampling
    encoder.load_state_dict(state)
    return encoder


def load_mae(folder: str | Path) -> MAE:
    """Rebuild the full MAE of an export (decoder included) and load its weights strictly."""
    meta = read_metadata(folder)
    if "mae" not in meta:
        raise ValueError(f"{folder}: an encoder-only export (no mae.safetensors)")
    enc = meta["encoder"]
    cfg = MAEConfig(encoder=encoder_config(enc), decoder=build(DecoderConfig, meta["mae"]["decoder"], "decoder"),
                    mask_ratio=meta["mae"]["mask_ratio"], norm_pix_loss=meta["mae"]["norm_pix_loss"],
                    encoder_mask_tokens=meta["mae"].get("encoder_mask_tokens", False))
    mae = MAE(cfg)
    if not enc.get("final_norm", True):
        mae.encoder.norm = torch.nn.Identity()
    state = load_file(str(Path(folder) / "mae.safetensors"))
    # position-embedding metadata: the encoder's as recorded, the decoder's fixed sin-cos as built
    state["encoder.pos_embed._extra_state"] = enc["pos_embed"]
    state["decoder_pos_embed._extra_state"] = mae.decoder_pos_embed.meta()
    mae.load_state_dict(state)
    return mae


def write_classifier_export(out: str | Path, model: ViTClassifier | DistilledViT, normalisation: dict[str, Any] | None,
                            extra: dict[str, Any] | None = None, objective: str = "finetune") -> Path:
    """A trained classifier: the usual encoder export plus ``head.safetensors`` (a fine-tuned classifier's pooling
    norm and head, or a DeiT model's two heads) and a ``classifier`` metadata entry, so evaluation and
    fine-tuning load its encoder as any other, and a DeiT student can use it as a teacher."""
    if isinstance(model, DistilledViT):
        parts = ("head", "head_dist")
        info = {"num_classes": model.num_classes, "pool": "cls", "distilled": True, "head": model.head_mode}
    else:
        parts, info = ("fc_norm", "head"), {"num_classes": model.num_classes, "pool": model.pool}
    head = torch.nn.ModuleDict({part: getattr(model, part) for part in parts})  # keys "<part>.<name>"
    out = write_export(out, model.encoder, None, normalisation, {"classifier": info, **(extra or {})}, objective)
    save_weights(head, Path(out) / "head.safetensors")
    return out


def load_classifier(folder: str | Path, image_size: tuple[int, int] | None = None) -> ViTClassifier | DistilledViT:
    info = read_metadata(folder).get("classifier")
    if info is None:
        raise ValueError(f"{folder}: an encoder export without a classification head")
    encoder = load_encoder(folder, image_size)
    model = (DistilledViT(encoder, info["num_classes"], info.get("head", "both")) if info.get("distilled")
             else ViTClassifier(encoder, info["num_classes"], info["pool"]))
    head = load_file(str(Path(folder) / "head.safetensors"))
    missing, unexpected = model.load_state_dict(head, strict=False)
    if unexpected or any(not k.startswith("encoder.") for k in missing):
        raise ValueError(f"{folder}: head.safetensors does not fit: missing {missing}, unexpected {unexpected}")
    return model
