"""Weights in and out: our encoder <-> timm's VisionTransformer, and imports of timm / MAE / DeiT files.

Every checkpoint is built here from a tiny randomly initialised model (width 64, depth 2, 32x32 images in
8x8 patches), written to disk in the layout its project releases, and read back.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from pipeline.exports.vit import load_encoder, read_metadata, write_export
from pipeline.models import MAE, DecoderConfig, MAEConfig, ViTConfig, ViTEncoder
from pipeline.models.convert import (
    IMAGENET_NORMALISATION,
    import_encoder,
    import_mae,
    timm_kwargs,
    to_timm_state_dict,
    write_timm,
)

TIMM_TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)


def tiny_cfg(**kw) -> ViTConfig:
    return ViTConfig(**{"size": "tiny", "embed_dim": 64, "depth": 2, "num_heads": 4, "image_size": (32, 32),
                        "patch_size": 8, **kw})


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random and of order one, so a misplaced tensor (or a tiny LayerScale) can't hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def imgs(h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))


def assert_same_features(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def timm_file(tmp_path, name: str = "vit.pth", model: torch.nn.Module | None = None, **kw):
    """A random timm model and its state dict saved to ``name`` (returns both)."""
    model = model or randomise(VisionTransformer(**{**TIMM_TINY, **kw}))
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return model, path


def mae_checkpoint(mae: MAE) -> dict[str, torch.Tensor]:
    """Our MAE in the released MAE layout: encoder keys at top level, decoder_pos_embed as a tensor."""
    sd = to_timm_state_dict(mae.encoder)
    sd.update({k: v for k, v in mae.state_dict().items()
               if not k.startswith("encoder.") and not k.endswith("_extra_state")})
    sd["decoder_pos_embed"] = mae.decoder_pos_embed.table.clone()
    return sd


def released_mae_sincos(dim: int, side: int) -> torch.Tensor:
    """facebookresearch/mae ``get_2d_sincos_pos_embed(dim, side, cls_token=True)``, transcribed: note its
    ``np.meshgrid(grid_w, grid_h)`` puts the x (column) encoding in the first half of the channels."""
    def one_d(d: int, pos: torch.Tensor) -> torch.Tensor:  # [M] -> [M, d]
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1, 1).double() * omega
        return torch.cat([out.sin(), out.cos()], dim=1)
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"))  # [2, h, w]
    table = torch.cat([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], dim=1)  # [h*w, dim]
    return torch.cat([torch.zeros(1, dim, dtype=table.dtype), table]).float().unsqueeze(0)  # [1, 1 + h*w, D]


def tiny_mae() -> MAE:
    decoder = DecoderConfig(depth=2, dim=64, num_heads=2)  # 64 // 32 heads: what import_mae infers
    return randomise(MAE(MAEConfig(encoder=tiny_cfg(pos_embed="sincos2d"), decoder=decoder)))


# -- export ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{"pos_embed": "learned"}, {"pos_embed": "sincos2d"},
                                {"pos_embed": "learned", "layer_scale": 0.1, "qkv_bias": False}])
def test_timm_round_trip(kw, tmp_path):
    ours = randomise(ViTEncoder(tiny_cfg(**kw)))
    theirs = VisionTransformer(**timm_kwargs(ours)).eval()
    theirs.load_state_dict(to_timm_state_dict(ours), strict=True)
    with torch.no_grad():
        assert_same_features(theirs.forward_features(imgs()), ours(imgs()))
    if kw["pos_embed"] == "sincos2d":  # the fixed table is written out, CLS row zero
        assert to_timm_state_dict(ours)["pos_embed"][0, 0].abs().max() == 0
    # the file carries the constructor's arguments
    with safe_open(str(write_timm(tmp_path, ours)), "pt") as f:
        assert json.loads(f.metadata()["timm_kwargs"])["init_values"] == kw.get("layer_scale")


def test_rope2d_has_no_timm_export():
    with pytest.raises(ValueError, match="rope2d"):
        to_timm_state_dict(ViTEncoder(tiny_cfg(pos_embed="rope2d")))


# -- import ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["plain.pth", "wrapped.pth", "flat.safetensors"])
def test_import_timm(layout, tmp_path):
    model = randomise(VisionTransformer(**TIMM_TINY))
    sd, path = model.state_dict(), tmp_path / layout
    if layout == "wrapped.pth":  # a DDP training checkpoint
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    elif layout == "flat.safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    encoder, report = import_encoder(path, num_heads=4)
    assert (report.format, report.ignored) == ("timm", ["head.bias", "head.weight"])
    assert encoder.cfg.pos_embed == "learned" and encoder.cfg.image_size == (32, 32)
    with torch.no_grad():
        assert_same_features(encoder.eval()(imgs()), model.forward_features(imgs()))


def test_import_no_class_position_with_layer_scale(tmp_path):
    """DeiT III style: LayerScale, and a position table without the CLS row."""
    model, path = timm_file(tmp_path, no_embed_class=True, init_values=1e-5)
    encoder, report = import_encoder(path, num_heads=4)
    assert encoder.cfg.layer_scale is not None and any("no_embed_class" in n for n in report.notes)
    with torch.no_grad():
        assert_same_features(encoder.eval()(imgs()), model.forward_features(imgs()))


def test_import_non_square_grid_needs_image_size(tmp_path):
    model, path = timm_file(tmp_path, img_size=(16, 24))  # 1 + 2x3 rows
    with pytest.raises(ValueError, match="pos_embed has 7 rows.*pass image_size"):
        import_encoder(path, num_heads=4)
    encoder, _ = import_encoder(path, num_heads=4, image_size=(16, 24))
    with torch.no_grad():
        assert_same_features(encoder.eval()(imgs(16, 24)), model.forward_features(imgs(16, 24)))


def test_import_mae(tmp_path):
    ref = tiny_mae()
    path = tmp_path / "mae.pth"
    torch.save({"model": mae_checkpoint(ref)}, path)
    encoder, report = import_encoder(path, num_heads=4)
    assert report.format == "mae" and encoder.cfg.pos_embed == "sincos2d"
    assert "mask_token" in report.ignored and "decoder_pred.weight" in report.ignored
    x, noise = imgs(), torch.rand(2, 16, generator=torch.Generator().manual_seed(2))
    mae = import_mae(path, num_heads=4).eval()
    assert mae.cfg.decoder == ref.cfg.decoder
    with torch.no_grad():
        assert torch.equal(encoder.eval()(x), ref.encoder(x))
        assert torch.equal(mae(x, noise)[0], ref(x, noise)[0])


def test_import_mae_released_channel_order(tmp_path):
    """Released MAE tables put x before y (ours: y before x). The encoder keeps the table as learned; the
    decoder, whose positions are fixed here, gets its residual channels permuted: same loss either way."""
    ref = tiny_mae()
    for pos in (ref.encoder.pos_embed, ref.decoder_pos_embed):  # now ``ref`` computes what released MAE does
        assert not torch.allclose(pos.table, released_mae_sincos(64, 4), atol=0.1)
        pos.table = released_mae_sincos(64, 4)
    path = tmp_path / "mae_released.pth"
    torch.save({"model": mae_checkpoint(ref)}, path)
    encoder, report = import_encoder(path, num_heads=4)
    assert encoder.cfg.pos_embed == "learned" and any("x before y" in n for n in report.notes)
    x, noise = imgs(), torch.rand(2, 16, generator=torch.Generator().manual_seed(2))
    mae = import_mae(path, num_heads=4).eval()
    with torch.no_grad():
        assert torch.equal(encoder.eval()(x), ref.encoder(x))
        loss, pred, _ = mae(x, noise)
        ref_loss, ref_pred, _ = ref(x, noise)
        assert_same_features(pred, ref_pred)
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)


def test_import_deit(tmp_path):
    model = randomise(VisionTransformerDistilled(**TIMM_TINY))
    sd = model.state_dict()
    path = tmp_path / "deit.pth"
    torch.save({"model": sd}, path)
    encoder, report = import_encoder(path, num_heads=4)
    assert report.format == "deit" and any("dist_token" in n for n in report.notes)
    assert report.ignored == ["head.bias", "head.weight", "head_dist.bias", "head_dist.weight"]
    ours = encoder.state_dict()
    pos = sd["pos_embed"]  # [1, 2 + N, D]: CLS, distillation, patches
    assert torch.equal(ours.pop("pos_embed.table"), torch.cat([pos[:, :1], pos[:, 2:]], dim=1))
    ours.pop("pos_embed._extra_state")
    assert ours.keys() == sd.keys() - {"pos_embed", "dist_token", *report.ignored}
    assert all(torch.equal(v, sd[k]) for k, v in ours.items())


# -- export folders from imported weights -------------------------------------------------------------
def test_export_folder_from_imports(tmp_path):
    model, path = timm_file(tmp_path)
    encoder, report = import_encoder(path, num_heads=4)
    out = write_export(tmp_path / "export", encoder, normalisation=IMAGENET_NORMALISATION,
                       extra={"source": report.meta()})
    write_timm(out, encoder)
    meta = read_metadata(out)
    assert meta["source"]["format"] == "timm" and len(meta["source"]["sha256"]) == 64
    assert not (out / "mae.safetensors").exists() and "mae" not in meta
    with torch.no_grad():
        assert_same_features(load_encoder(out).eval()(imgs()), model.forward_features(imgs()))
        assert load_encoder(out, image_size=(48, 32))(imgs(48, 32)).shape == (2, 1 + 24, 64)

    ref = tiny_mae()
    torch.save({"model": mae_checkpoint(ref)}, tmp_path / "mae.pth")
    mae = import_mae(tmp_path / "mae.pth", num_heads=4)
    out = write_export(tmp_path / "export_mae", mae.encoder, mae)
    meta = read_metadata(out)
    assert meta["mae"]["decoder"] == {"depth": 2, "dim": 64, "num_heads": 2, "mlp_ratio": 4.0}
    assert meta["normalisation"] == {"mean": None, "std": None}
    with torch.no_grad():
        assert torch.equal(load_encoder(out).eval()(imgs()), ref.encoder(imgs()))


# -- errors name the problem ------------------------------------------------------------------------------
def test_unknown_width_needs_heads(tmp_path):
    _, path = timm_file(tmp_path)
    with pytest.raises(ValueError, match="embed_dim 64 .*pass num_heads"):
        import_encoder(path)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), r"missing keys \['blocks.1.mlp.fc2.bias'\]"),
    (lambda sd: sd.update(reg_token=torch.zeros(1, 1, 64)), r"unexpected keys \['reg_token'\]"),
    (lambda sd: sd.update({"blocks.1.attn.proj.weight": torch.zeros(64, 32)}),
     r"blocks.1.attn.proj.weight has shape \[64, 32\], the model needs \[64, 64\]"),
])
def test_bad_state_dicts(edit, message, tmp_path):
    sd = randomise(VisionTransformer(**TIMM_TINY)).state_dict()
    edit(sd)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=f"bad.pth: .*{message}"):
        import_encoder(tmp_path / "bad.pth", num_heads=4)


def test_import_mae_needs_a_decoder(tmp_path):
    _, path = timm_file(tmp_path)
    with pytest.raises(ValueError, match="no MAE decoder"):
        import_mae(path, num_heads=4)
