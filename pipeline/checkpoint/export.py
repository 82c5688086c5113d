"""Export a committed checkpoint (or imported weights, ``write_export``) to safetensors weights plus a
metadata file, and load them back.

``<out>/encoder.safetensors``   the ViT encoder alone (what fine-tuning and evaluation use)
``<out>/mae.safetensors``       the full MAE, decoder included
``<out>/timm.safetensors``      the encoder in timm's names, when asked (``models.convert.write_timm``)
``<out>/metadata.json``         architecture, image and patch size, position-embedding kind / grid /
                                prefix tokens, normalisation stats, recipe hash, step
Position-embedding metadata is not a tensor, so it lives in ``metadata.json`` and is handed back to the
model on load: loading at another image size resamples from the recorded grid, never a guessed one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..config import build, digest, to_dict
from ..models import MAE, MAEConfig, ViTConfig, ViTEncoder
from ..models.classifier import ViTClassifier
from ..models.config import DecoderConfig
from ..models.deit import DistilledViT
from .state import read_module_state, submodule_state
from .store import CONFIG, MARKER, STATE

FORMAT = "vitpipe.export/1"


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # contiguous clones: safetensors refuses shared or strided storage
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()
            if isinstance(v, torch.Tensor)}


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Committed checkpoint folder (``step-N/``) -> ``out`` with safetensors files and ``metadata.json``."""
    ckpt, out = Path(checkpoint), Path(out)
    if not (ckpt / MARKER).is_file():
        raise FileNotFoundError(f"{ckpt}: not a complete checkpoint (no {MARKER} marker)")
    recipe = yaml.safe_load((ckpt / CONFIG).read_text())
    transform = recipe.get("data", {}).get("transform", {})
    normalisation = {"mean": transform.get("mean"), "std": transform.get("std")}
    extra = {"recipe_name": recipe.get("name"), "recipe_hash": digest(recipe),
             "step": json.loads((ckpt / MARKER).read_text())["step"], "source_checkpoint": str(ckpt.resolve())}
    if recipe.get("task") == "deit":  # a DeiT student: encoder + both heads
        m = recipe["model"]
        model = DistilledViT(ViTEncoder(build(ViTConfig, m["encoder"], "model.encoder")), m["num_classes"],
                             m.get("head", "both"))
        model.load_state_dict(submodule_state(read_module_state(ckpt / STATE)))
        return write_classifier_export(out, model, normalisation, extra)
    model = MAE(build(MAEConfig, recipe["model"], "model"))
    model.load_state_dict(submodule_state(read_module_state(ckpt / STATE)))
    return write_export(out, model.encoder, model, normalisation=normalisation, extra=extra)


def write_export(out: str | Path, encoder: ViTEncoder, mae: MAE | None = None,
                 normalisation: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """The one writer of an export folder: ``encoder.safetensors``, ``mae.safetensors`` when ``mae`` is given
    (its encoder should be ``encoder``), and ``metadata.json``.

    normalisation: {"mean": [...], "std": [...]} of the input transform (None: unknown). extra: entries
    appended to the metadata: recipe name / hash and step for a trained checkpoint, ``source`` for imports.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(encoder), str(out / "encoder.safetensors"))
    meta: dict[str, Any] = {"format": FORMAT, "encoder": encoder.meta()}
    if mae is not None:
        save_file(_tensors(mae), str(out / "mae.safetensors"))
        meta["mae"] = {"decoder": to_dict(mae.cfg.decoder), "mask_ratio": mae.cfg.mask_ratio,
                       "norm_pix_loss": mae.cfg.norm_pix_loss, "encoder_mask_tokens": mae.cfg.encoder_mask_tokens}
    meta["normalisation"] = normalisation or {"mean": None, "std": None}
    meta.update(extra or {})
    (out / "metadata.json").write_text(json.dumps(meta, indent=1))
    return out


def read_metadata(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "metadata.json"
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta


def encoder_config(meta: dict[str, Any], image_size: tuple[int, int] | None = None) -> ViTConfig:
    """The architecture an export's ``encoder`` metadata describes, at ``image_size`` when given."""
    return ViTConfig(size=meta["size"], image_size=tuple(image_size or meta["image_size"]),
                     patch_size=meta["patch_size"], in_chans=meta["in_chans"], pos_embed=meta["pos_embed"]["kind"],
                     layer_scale=meta["layer_scale"], embed_dim=meta["embed_dim"], depth=meta["depth"],
                     num_heads=meta["num_heads"], mlp_ratio=meta.get("mlp_ratio", 4.0),
                     qkv_bias=meta.get("qkv_bias", True), distill_token=meta.get("distill_token", False))


def load_encoder(folder: str | Path, image_size: tuple[int, int] | None = None) -> ViTEncoder:
    """Rebuild the exported encoder, optionally at another image size (positions are resampled)."""
    meta = read_metadata(folder)["encoder"]
    pos = meta["pos_embed"]
    cfg = encoder_config(meta, image_size)
    encoder = ViTEncoder(cfg)
    if not meta.get("final_norm", True):
        encoder.norm = torch.nn.Identity()
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
                            extra: dict[str, Any] | None = None) -> Path:
    """A trained classifier: the usual encoder export plus ``head.safetensors`` (a fine-tuned classifier's pooling
    norm and head, or a DeiT model's two heads) and a ``classifier`` metadata entry, so evaluation and
    fine-tuning load its encoder as any other, and a DeiT student can use it as a teacher."""
    if isinstance(model, DistilledViT):
        parts = ("head", "head_dist")
        info = {"num_classes": model.num_classes, "pool": "cls", "distilled": True, "head": model.head_mode}
    else:
        parts, info = ("fc_norm", "head"), {"num_classes": model.num_classes, "pool": model.pool}
    head = {f"{part}.{k}": v for part in parts for k, v in _tensors(getattr(model, part)).items()}
    out = write_export(out, model.encoder, None, normalisation, {"classifier": info, **(extra or {})})
    save_file(head, str(Path(out) / "head.safetensors"))
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
