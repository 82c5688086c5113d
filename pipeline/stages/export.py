"""``vitpipe export`` and ``import-weights``: a committed checkpoint of any objective, or a released MAE / DeiT /
timm file, -> an export folder (safetensors + ``metadata.json``) that register, finetune and evaluate read."""
from __future__ import annotations

from pathlib import Path

from ..checkpoint.store import CONFIG, committed_step
from ..objectives.registry import objective_of
from ..objectives.trained import export_trained
from ..recipe import load_recipe


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """A committed checkpoint (``step-N/``, or a checkpoint folder: its newest complete step) -> ``out``, written
    by the objective of the recipe the checkpoint saved."""
    step = committed_step(checkpoint)
    recipe = load_recipe(str(step / CONFIG))
    return export_trained(objective_of(recipe), recipe, step, out)


def export_timm_names(out: str | Path) -> Path:
    """Also write ``timm.safetensors`` (the encoder in timm's VisionTransformer names) into a ViT export."""
    from ..exports.vit import load_encoder
    from ..models.convert import write_timm

    return write_timm(out, load_encoder(out))


def import_weights(weights: str | Path, out: str | Path, with_mae: bool = False, num_heads: int | None = None,
                   image_size: tuple[int, int] | None = None, mean: list[float] | None = None,
                   std: list[float] | None = None) -> tuple[Path, list[str]]:
    """A released checkpoint or timm state dict (a local file) -> an export folder; also the lines that say what
    the import inferred and what it left out."""
    from ..config import IMAGENET_NORMALISATION
    from ..exports.vit import write_export
    from ..models.convert import import_encoder, import_mae

    encoder, report = import_encoder(weights, num_heads, image_size)
    mae = import_mae(weights, num_heads, image_size=image_size) if with_mae else None
    norm = {"mean": mean or IMAGENET_NORMALISATION["mean"], "std": std or IMAGENET_NORMALISATION["std"]}
    folder = write_export(out, mae.encoder if mae else encoder, mae, norm, {"source": report.meta()})
    lines = [f"imported {weights} ({report.format}) -> {folder}", *(f"  note: {n}" for n in report.notes)]
    if report.ignored:
        lines.append(f"  ignored: {', '.join(report.ignored)}")
    return folder, lines
