"""Models without mocks: MAE masking and loss, patchify, position embeddings across grids, parameter counts
against timm, one ViT-L/16 training step on CPU, RoPE, and the optimizer's groups and schedule."""
from __future__ import annotations

import io
import math

import pytest
import timm
import torch

from pipeline.models import MAE, DecoderConfig, MAEConfig, ViTConfig, ViTEncoder
from pipeline.models.pos_embed import resample_grid, resample_table
from pipeline.tasks.config import OptimConfig
from pipeline.tasks.optim import absolute_lr, build_optimizer, param_groups, warmup_cosine


def tiny_encoder_cfg(kind: str = "sincos2d", image_size=(64, 64), patch_size: int = 16, **kw) -> ViTConfig:
    return ViTConfig(size="tiny", depth=kw.pop("depth", 1), embed_dim=32, num_heads=4, image_size=image_size,
                     patch_size=patch_size, pos_embed=kind, **kw)


def tiny_mae(mask_ratio: float = 0.75, norm_pix_loss: bool = True, kind: str = "sincos2d",
             image_size=(32, 32), patch_size: int = 8, **kw) -> MAE:
    encoder = tiny_encoder_cfg(kind, image_size, patch_size, layer_scale=kw.pop("layer_scale", None))
    cfg = MAEConfig(encoder=encoder,
                    decoder=DecoderConfig(depth=1, dim=16, num_heads=2), mask_ratio=mask_ratio,
                    norm_pix_loss=norm_pix_loss, **kw)
    return MAE(cfg)


def tiny_encoder(kind: str, image_size=(64, 64)) -> ViTEncoder:
    return ViTEncoder(tiny_encoder_cfg(kind, image_size))


# -- random masking ----------------------------------------------------------------------------------------

# (mask_ratio, L, K = round((1 - r) * L)), K written out rather than recomputed with the model's formula.
MASKING_CASES = [
    (0.75, 196, 49), (0.75, 16, 4), (0.75, 7, 2), (0.75, 256, 64),
    (0.6, 196, 78), (0.6, 10, 4), (0.6, 49, 20),
    (0.5, 196, 98), (0.5, 16, 8), (0.5, 9, 4),
]


@pytest.mark.parametrize("ratio,L,K", MASKING_CASES)
def test_random_masking_keeps_round_share_and_mask_agrees(ratio, L, K):
    assert K == round((1 - ratio) * L)
    mae = tiny_mae(mask_ratio=ratio)
    B, D = 3, 5
    g = torch.Generator().manual_seed(L)
    # Token l of sample b is identifiable: every channel holds 1000 * b + l (+ channel / 10).
    x = (1000 * torch.arange(B).view(B, 1, 1) + torch.arange(L).view(1, L, 1)
         + torch.arange(D).view(1, 1, D) / 10).float()
    noise = torch.rand(B, L, generator=g)
    x_kept, mask, ids_restore, ids_keep = mae.random_masking(x, noise)

    assert mae.num_kept(L) == K
    assert x_kept.shape == (B, K, D) and ids_keep.shape == (B, K)
    assert mask.shape == (B, L) and ids_restore.shape == (B, L)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum(dim=1).tolist() == [float(L - K)] * B
    for b in range(B):
        keep = ids_keep[b]
        assert len(set(keep.tolist())) == K  # no patch kept twice
        # kept == the K smallest noises
        assert sorted(keep.tolist()) == sorted(torch.argsort(noise[b])[:K].tolist())
        # gather with ids_keep is x at those indices, in ids_keep order ...
        assert torch.equal(x_kept[b], x[b, keep])
        # ... and the kept set is exactly where mask == 0 (x[mask == 0] is in patch order)
        visible = (mask[b] == 0).nonzero().flatten()
        assert torch.equal(visible, keep.sort().values)
        assert torch.equal(x_kept[b][keep.argsort()], x[b][mask[b] == 0])


@pytest.mark.parametrize("ratio,L,K", MASKING_CASES[::3])
def test_ids_restore_undoes_the_shuffle(ratio, L, K):
    mae = tiny_mae(mask_ratio=ratio)
    B, D = 2, 4
    x = torch.randn(B, L, D, generator=torch.Generator().manual_seed(1))
    noise = torch.rand(B, L, generator=torch.Generator().manual_seed(2))
    x_kept, mask, ids_restore, ids_keep = mae.random_masking(x, noise)
    # What the decoder does: kept tokens then placeholder mask tokens, gathered back to patch order.
    placeholder = torch.full((B, L - K, D), float("nan"))
    shuffled = torch.cat([x_kept, placeholder], dim=1)
    restored = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    visible = mask == 0
    assert torch.equal(restored[visible], x[visible])  # every kept token is back at its original index
    assert torch.isnan(restored[~visible]).all()  # and the placeholders sit exactly at the masked ones
    for b in range(B):
        assert torch.equal(restored[b, ids_keep[b]], x_kept[b])
        assert sorted(ids_restore[b].tolist()) == list(range(L))


def test_random_masking_is_per_sample():
    mae = tiny_mae()
    noise = torch.rand(4, 64, generator=torch.Generator().manual_seed(3))
    _, mask, _, _ = mae.random_masking(torch.zeros(4, 64, 2), noise)
    assert len({tuple(row.tolist()) for row in mask}) == 4


# -- loss ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_ignores_visible_patches(norm_pix_loss):
    torch.manual_seed(0)
    mae = tiny_mae(norm_pix_loss=norm_pix_loss)  # 32x32, patch 8 -> 16 patches of 192 values
    imgs = torch.randn(2, 3, 32, 32)
    L = mae.encoder.num_patches
    _, mask, _, _ = mae.random_masking(torch.zeros(2, L, 1), torch.rand(2, L))
    pred = torch.randn(2, L, 8 * 8 * 3)
    loss = mae.forward_loss(imgs, pred, mask)
    assert torch.isfinite(loss)

    # The value: mean over masked patches of the per-patch MSE against the (normalised) target.
    target = mae.patchify(imgs)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(loss, per_patch[mask == 1].mean())

    visible_changed = pred.clone()
    visible_changed[mask == 0] += 100.0 * torch.randn_like(visible_changed[mask == 0])
    assert torch.equal(mae.forward_loss(imgs, visible_changed, mask), loss)

    b, token = (mask == 1).nonzero()[0].tolist()
    masked_changed = pred.clone()
    masked_changed[b, token, 0] += 1.0
    assert not torch.equal(mae.forward_loss(imgs, masked_changed, mask), loss)

    # The gradient says the same: zero on visible patches, non-zero on masked ones.
    p = pred.clone().requires_grad_(True)
    mae.forward_loss(imgs, p, mask).backward()
    assert (p.grad[mask == 0] == 0).all()
    assert (p.grad[mask == 1].abs().sum(-1) > 0).all()


def test_norm_pix_target_is_normalised_per_patch():
    mae = tiny_mae(norm_pix_loss=True)
    imgs = 5 + 3 * torch.randn(2, 3, 32, 32)
    t = mae.target(imgs)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 16), atol=1e-4, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(2, 16), atol=1e-3, rtol=0)
    assert torch.equal(tiny_mae(norm_pix_loss=False).target(imgs), mae.patchify(imgs))


# -- pixels <-> patches ----------------------------------------------------------------------------------

def test_patchify_unpatchify_round_trip_non_square():
    p = 8
    mae = tiny_mae(image_size=(32, 48), patch_size=p)  # grid 4 x 6
    gh, gw = 4, 6
    imgs = torch.randn(2, 3, 32, 48)
    patches = mae.patchify(imgs)
    assert patches.shape == (2, gh * gw, p * p * 3)
    assert torch.equal(mae.unpatchify(patches), imgs)
    # Row-major patch order, pixels in (p, p, C) order.
    for r, c in [(0, 0), (0, 5), (3, 0), (2, 4), (3, 5)]:
        block = imgs[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p]  # [B, C, p, p]
        torch.testing.assert_close(patches[:, r * gw + c], block.permute(0, 2, 3, 1).reshape(2, -1), rtol=0,
                                   atol=0)


# -- position embeddings across grids ---------------------------------------------------------------------

def _linear_table(grid, coef: torch.Tensor) -> torch.Tensor:
    """[gh*gw, D]: channel d = a_d * y + b_d * x + c_d, x and y the patch centres normalised to (0, 1)."""
    gh, gw = grid
    ys, xs = torch.meshgrid((torch.arange(gh) + 0.5) / gh, (torch.arange(gw) + 0.5) / gw, indexing="ij")
    a, b, c = coef
    return ys.reshape(-1, 1) * a + xs.reshape(-1, 1) * b + c


def _load_linear_learned(src: ViTEncoder, coef: torch.Tensor, cls_row: torch.Tensor) -> None:
    with torch.no_grad():
        src.pos_embed.table[0, 0] = cls_row
        src.pos_embed.table[0, 1:] = _linear_table(src.pos_embed.grid, coef)


def test_learned_pos_embed_resamples_to_non_square_grid():
    torch.manual_seed(0)
    src = tiny_encoder("learned", (64, 64))  # grid 4 x 4
    dst = tiny_encoder("learned", (48, 80))  # grid 3 x 5
    assert src.pos_embed.grid == (4, 4) and dst.pos_embed.grid == (3, 5)
    coef = torch.rand(3, 32) * 2 - 1
    cls_row = torch.randn(32)
    _load_linear_learned(src, coef, cls_row)
    state = src.state_dict()
    assert state["pos_embed._extra_state"]["grid"] == [4, 4]

    result = dst.load_state_dict(state)  # strict
    assert not result.missing_keys and not result.unexpected_keys
    table = dst.pos_embed.table.detach()
    assert table.shape == (1, 1 + 15, 32)
    assert torch.equal(table[0, 0], cls_row)  # the CLS row is kept as is
    torch.testing.assert_close(table[0, 1:], _linear_table((3, 5), coef), atol=0.05, rtol=0)
    # Every other weight came across unchanged; the caller's state dict was not modified.
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert torch.equal(dst.patch_embed.proj.weight, src.patch_embed.proj.weight)
    assert state["pos_embed.table"].shape == (1, 17, 32)
    # The loaded model records its own grid, so its weights travel on correctly.
    assert dst.state_dict()["pos_embed._extra_state"]["grid"] == [3, 5]
    back = tiny_encoder("learned", (64, 64))
    back.load_state_dict(dst.state_dict())
    assert torch.equal(back.pos_embed.table[0, 0], cls_row)
    torch.testing.assert_close(back.pos_embed.table[0, 1:].detach(), _linear_table((4, 4), coef), atol=0.08,
                               rtol=0)
    out = dst(torch.randn(2, 3, 48, 80))
    assert out.shape == (2, 16, 32) and torch.isfinite(out).all()


def test_learned_resampling_follows_metadata_not_sequence_length():
    # 2 x 8 and 4 x 4 both have 16 patches: a loader guessing the grid from the length would copy the table.
    torch.manual_seed(0)
    src = tiny_encoder("learned", (32, 128))  # grid 2 x 8
    dst = tiny_encoder("learned", (64, 64))  # grid 4 x 4
    coef = torch.tensor([[1.0] * 32, [-1.0] * 32, [0.0] * 32])
    _load_linear_learned(src, coef, torch.zeros(32))
    dst.load_state_dict(src.state_dict())
    table = dst.pos_embed.table.detach()[0, 1:]
    assert not torch.allclose(table, src.pos_embed.table.detach()[0, 1:])
    torch.testing.assert_close(table, _linear_table((4, 4), coef), atol=0.1, rtol=0)


def test_resample_grid_identity_and_table_prefix():
    t = torch.randn(12, 8)
    assert resample_grid(t, (3, 4), (3, 4)) is t
    full = torch.randn(1, 1 + 12, 8)
    assert torch.equal(resample_table(full, (3, 4), 1, (3, 4), 1), full)
    with pytest.raises(ValueError, match="rows"):
        resample_table(full, (4, 4), 1, (3, 4), 1)


def test_resample_grid_treats_height_and_width_alike():
    t = torch.randn(4, 4, 3, generator=torch.Generator().manual_seed(0))
    for new in [(4, 2), (3, 5), (2, 6)]:
        a = resample_grid(t.reshape(16, 3), (4, 4), new).reshape(*new, 3)
        transposed = resample_grid(t.transpose(0, 1).reshape(16, 3), (4, 4), new[::-1]).reshape(*new[::-1], 3)
        torch.testing.assert_close(a, transposed.transpose(0, 1))


def test_a_checkpoint_of_an_unfused_adamw_resumes_fused_and_steps_alike():
    """An optimizer state written by the unfused AdamW of earlier releases loads into the fused one: the groups
    stay fused (the guard skips steps through the fused kernel) and the next step is the unfused one's."""
    torch.manual_seed(0)
    model = tiny_mae()
    cfg = OptimConfig()
    groups = param_groups(model, cfg.weight_decay)
    old = torch.optim.AdamW(groups, lr=1e-3, betas=cfg.betas, fused=False)
    imgs = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        old.zero_grad()
        model(imgs)[0].backward()
        old.step()
    buffer = io.BytesIO()  # through a file, as a checkpoint: the loaded state shares no tensor with ``old``
    torch.save(old.state_dict(), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert not any(g["fused"] for g in saved["param_groups"])

    twin = tiny_mae()
    twin.load_state_dict(model.state_dict())
    opt, _ = build_optimizer(twin, cfg, effective_batch=256, total_steps=10, warmup_steps=1)
    opt.load_state_dict(saved)
    assert all(g["fused"] and not g["foreach"] for g in opt.param_groups)
    assert opt.param_groups[0]["lr"] == saved["param_groups"][0]["lr"]
    for m, o in ((model, old), (twin, opt)):  # one more step each, from the same state
        torch.manual_seed(1)
        o.zero_grad()
        m(imgs)[0].backward()
        o.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)  # (the kernels' rounding only)


@pytest.mark.parametrize("kind", ["learned", "sincos2d", "rope2d"])
def test_same_grid_load_reproduces_outputs(kind):
    torch.manual_seed(0)
    src, dst = tiny_encoder(kind), tiny_encoder(kind)
    src.eval(), dst.eval()
    dst.load_state_dict(src.state_dict())
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(img), src(img), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["sincos2d", "rope2d"])
def test_fixed_and_rotary_encoders_load_across_resolutions(kind):
    torch.manual_seed(0)
    src = tiny_encoder(kind, (64, 64))
    dst = tiny_encoder(kind, (48, 80))
    state = src.state_dict()
    assert "pos_embed.table" not in state  # nothing to resample: the table is fixed or absent
    result = dst.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(dst.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)
    if kind == "rope2d":
        assert dst.pos_embed.trained_grid == (4, 4)  # positions interpolate onto the trained grid
        assert dst.pos_embed.meta()["grid"] == [4, 4]
        angles = dst.pos_embed.rope(None, 1, torch.device("cpu"))
        assert angles.shape == (1, 1, 15, 32 // 4 // 2)
    else:
        assert dst.pos_embed.table.shape == (1, 16, 32)
    with torch.no_grad():
        out = dst(torch.randn(2, 3, 48, 80))
    assert out.shape == (2, 16, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("saved,built", [("learned", "sincos2d"), ("sincos2d", "learned"),
                                         ("sincos2d", "rope2d"), ("rope2d", "learned")])
def test_loading_another_pos_embed_kind_raises(saved, built):
    with pytest.raises(ValueError, match=f"{saved}.*{built}"):
        tiny_encoder(built).load_state_dict(tiny_encoder(saved).state_dict())


# -- sizes against timm -----------------------------------------------------------------------------------

@pytest.mark.parametrize("timm_name,size,patch,lo,hi", [
    ("vit_large_patch16_224", "large", 16, 303e6, 305e6),
    ("vit_huge_patch14_224", "huge", 14, 630e6, 633e6),
])
def test_parameter_counts_match_timm(timm_name, size, patch, lo, hi):
    with torch.device("meta"):
        ref = timm.create_model(timm_name, pretrained=False, num_classes=0)
        ours = ViTEncoder(ViTConfig(size=size, patch_size=patch, image_size=(224, 224), pos_embed="learned"))
    n_ref = sum(p.numel() for p in ref.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == n_ref
    assert lo <= n_ours <= hi
    # Same names and shapes too (only the position table has its own name).
    ref_shapes = {k: tuple(v.shape) for k, v in ref.named_parameters()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.named_parameters()}
    assert ref_shapes.pop("pos_embed") == our_shapes.pop("pos_embed.table")
    assert our_shapes == ref_shapes


# -- one real training step of ViT-L/16 ----------------------------------------------------------------------

def test_mae_vit_large_training_step_on_cpu():
    torch.manual_seed(0)
    cfg = MAEConfig(encoder=ViTConfig(size="large", patch_size=16, image_size=(224, 224)))
    assert (cfg.decoder.depth, cfg.decoder.dim) == (8, 512)
    mae = MAE(cfg)
    n = sum(p.numel() for p in mae.parameters())
    assert 320e6 < n < 340e6  # 303M encoder + ~26M decoder
    opt, sched = build_optimizer(mae, OptimConfig(), effective_batch=4096, total_steps=100, warmup_steps=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(absolute_lr(OptimConfig(), 4096) / 10)

    watched = {"cls_token": mae.encoder.cls_token, "mask_token": mae.mask_token,
               "qkv": mae.encoder.blocks[0].attn.qkv.weight,
               "last_fc2": mae.encoder.blocks[-1].mlp.fc2.weight,
               "decoder_pred": mae.decoder_pred.weight, "decoder_pred_bias": mae.decoder_pred.bias}
    before = {k: v.detach().clone() for k, v in watched.items()}

    imgs = torch.randn(2, 3, 224, 224)
    loss, pred, mask = mae(imgs)
    assert pred.shape == (2, 196, 768) and mask.shape == (2, 196)
    assert mask.sum().item() == 2 * (196 - 49)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name, p in mae.named_parameters():
        assert p.grad is not None, name
    assert all(torch.isfinite(v.grad).all() for v in watched.values())
    opt.step()
    sched.step()
    for k, v in watched.items():
        assert not torch.equal(v.detach(), before[k]), k
        assert torch.isfinite(v).all(), k


@pytest.mark.parametrize("kind", ["learned", "sincos2d", "rope2d"])
def test_encoder_mask_tokens_variant_same_shapes(kind):
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    outs = {}
    for flag in (False, True):
        mae = tiny_mae(kind=kind, encoder_mask_tokens=flag)
        latent, mask, ids_restore = mae.forward_encoder(imgs, noise)
        loss, pred, mask2 = mae(imgs, noise)
        loss.backward()
        assert torch.isfinite(loss)
        outs[flag] = (latent.shape, mask, ids_restore, pred.shape, mask2)
    assert hasattr(mae, "encoder_mask_token") and mae.encoder_mask_token.grad is not None
    assert outs[True][0] == outs[False][0] == (2, 1 + 4, 32)
    assert outs[True][3] == outs[False][3] == (2, 16, 8 * 8 * 3)
    for i in (1, 2, 4):  # same noise -> same masking in both variants
        assert torch.equal(outs[True][i], outs[False][i])


# -- RoPE ----------------------------------------------------------------------------------------------------

def test_rope_encoder_is_position_sensitive():
    torch.manual_seed(0)
    enc = tiny_encoder("rope2d", (64, 64)).eval()  # grid 4 x 4
    img = torch.randn(1, 3, 64, 64)
    rolled = torch.roll(img, shifts=16, dims=-1)  # one patch to the right (circularly)

    def patch_grid(out):
        return out[:, 1:].reshape(1, 4, 4, -1)

    with torch.no_grad():
        out, out_rolled = enc(img), enc(rolled)
        assert not torch.allclose(out, out_rolled, atol=1e-4)
        # Undo the roll on the output: still different, RoPE tells the positions apart.
        back = torch.roll(patch_grid(out_rolled), shifts=-1, dims=2)
        assert (back - patch_grid(out)).abs().max() > 1e-3
        # Baseline: the same weights without positions are permutation-equivariant, so undoing the roll
        # gives back the same patch features (the difference above is RoPE's doing).
        enc.pos_embed.kind = "none"
        out_np, out_rolled_np = enc(img), enc(rolled)
        back_np = torch.roll(patch_grid(out_rolled_np), shifts=-1, dims=2)
        torch.testing.assert_close(back_np, patch_grid(out_np), atol=1e-5, rtol=1e-5)


def test_rope_and_sincos_encoders_have_the_same_parameters():
    rope, sincos = tiny_encoder("rope2d"), tiny_encoder("sincos2d")
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.named_parameters()}  # noqa: E731
    assert shapes(rope) == shapes(sincos)
    assert sum(p.numel() for p in rope.parameters()) == sum(p.numel() for p in sincos.parameters())
    assert rope.state_dict().keys() == sincos.state_dict().keys()


# -- optimizer ---------------------------------------------------------------------------------------------

def test_param_groups_split_decay_and_no_decay():
    mae = tiny_mae(kind="learned", encoder_mask_tokens=True, layer_scale=1e-5)
    groups = param_groups(mae, weight_decay=0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    names = {id(p): n for n, p in mae.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert decay.isdisjoint(no_decay) and decay | no_decay == set(names.values())
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(names)

    for expected in ("encoder.cls_token", "mask_token", "encoder_mask_token", "encoder.pos_embed.table",
                     "encoder.norm.weight", "encoder.norm.bias", "encoder.blocks.0.norm1.weight",
                     "encoder.blocks.0.attn.qkv.bias", "encoder.blocks.0.ls1.gamma", "decoder_norm.weight",
                     "decoder_pred.bias", "encoder.patch_embed.proj.bias"):
        assert expected in no_decay, expected
    for n, p in mae.named_parameters():
        if n.endswith(".bias") or "norm" in n:
            assert n in no_decay, n
        if p.ndim >= 2 and not any(t in n for t in ("cls_token", "mask_token", "pos_embed")):
            assert n in decay, n
    for expected in ("encoder.blocks.0.attn.qkv.weight", "encoder.blocks.0.mlp.fc1.weight",
                     "encoder.patch_embed.proj.weight", "decoder_embed.weight", "decoder_pred.weight"):
        assert expected in decay, expected


def test_warmup_cosine_schedule():
    peak, floor, warmup, total = 2.4e-3, 1e-5, 10, 110
    lr = [warmup_cosine(s, warmup, total, peak, floor) for s in range(total + 20)]
    # Linear warmup from 0 towards the peak: equal increments, the line starts at 0.
    for s in range(warmup):
        assert lr[s] == pytest.approx(peak * (s + 1) / warmup)
        assert 0 < lr[s] <= peak
    steps = [lr[s + 1] - lr[s] for s in range(warmup - 1)]
    assert max(steps) == pytest.approx(min(steps)) and steps[0] > 0
    assert lr[warmup - 1] == pytest.approx(peak) and lr[warmup] == pytest.approx(peak)
    assert max(lr) == pytest.approx(peak)
    # Cosine decay to the floor at ``total`` and flat after it.
    assert all(a >= b for a, b in zip(lr[warmup:total], lr[warmup + 1:total + 1]))
    assert lr[(warmup + total) // 2] == pytest.approx((peak + floor) / 2)
    assert lr[total] == pytest.approx(floor) and lr[-1] == pytest.approx(floor)
    quarter = warmup + (total - warmup) // 4
    assert lr[quarter] == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi / 4)))


def test_absolute_lr_scales_with_batch():
    cfg = OptimConfig(base_lr=1.5e-4)
    assert absolute_lr(cfg, 4096) == pytest.approx(2.4e-3)
    assert absolute_lr(cfg, 256) == pytest.approx(1.5e-4)
    assert absolute_lr(OptimConfig(base_lr=1e-3), 128) == pytest.approx(5e-4)


def test_build_optimizer_schedule_follows_warmup_cosine():
    mae = tiny_mae()
    cfg = OptimConfig(base_lr=1e-3, min_lr=1e-6)
    opt, sched = build_optimizer(mae, cfg, effective_batch=512, total_steps=20, warmup_steps=4)
    peak = absolute_lr(cfg, 512)
    seen = []
    for _ in range(25):
        seen.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["lr"] == seen[-1]
        opt.step()
        sched.step()
    expected = [warmup_cosine(s, 4, 20, peak, 1e-6) for s in range(25)]
    assert seen == pytest.approx(expected)
    assert opt.defaults["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("kind", ["learned", "sincos2d", "rope2d"])
def test_bf16_parameters_with_fp32_buffers_run_in_bf16(kind):
    """DeepSpeed's bf16 engine casts parameters, not buffers: fixed position tables stay fp32 and must not
    promote the bf16 activations (LayerNorm would then refuse the mix)."""
    enc = ViTConfig(size="tiny", image_size=(32, 32), patch_size=4, embed_dim=64, depth=2, num_heads=4,
                    pos_embed=kind)
    model = MAE(MAEConfig(encoder=enc, decoder=DecoderConfig(depth=1, dim=32, num_heads=4)))
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    loss, pred, _ = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert pred.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
