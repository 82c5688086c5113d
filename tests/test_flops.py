"""The MAE FLOP count used for MFU equals what the model actually runs, and activation checkpointing
changes memory, not results."""
import pytest
import torch
from timm.layers import set_fused_attn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models import MAE, DecoderConfig, MAEConfig, ViTConfig
from pipeline.models.block_options import set_activation_checkpointing
from pipeline.models.flops import block_flops, mae_forward_flops, mae_train_flops_per_image


@pytest.fixture
def explicit_attention():
    """timm's explicit q @ k^T path, whose matrix products the FLOP counter sees (CPU SDPA it does not)."""
    set_fused_attn(False)
    yield
    set_fused_attn(True)


@pytest.mark.parametrize("mask_ratio, image, patch, mask_tokens", [
    (0.75, (32, 32), 4, False), (0.6, (24, 40), 8, False), (0.75, (32, 32), 4, True)])
def test_forward_flops_equal_counted_matrix_products(explicit_attention, mask_ratio, image, patch, mask_tokens):
    enc = ViTConfig(size="tiny", image_size=image, patch_size=patch, embed_dim=64, depth=3, num_heads=4)
    cfg = MAEConfig(encoder=enc, decoder=DecoderConfig(depth=2, dim=32, num_heads=4), mask_ratio=mask_ratio,
                    encoder_mask_tokens=mask_tokens)
    model = MAE(cfg)
    assert not model.encoder.blocks[0].attn.fused_attn
    imgs = torch.randn(3, 3, *image)
    with FlopCounterMode(display=False) as counter:
        model(imgs)
    assert counter.get_total_flops() == 3 * sum(mae_forward_flops(cfg).values())


def test_encoder_counts_visible_tokens_only():
    cfg = MAEConfig(encoder=ViTConfig(size="large", patch_size=16), mask_ratio=0.75)
    flops = mae_forward_flops(cfg)
    # 196 patches, 49 kept, plus CLS: the encoder's 24 blocks see 50 tokens, the decoder's 8 see 197.
    assert flops["encoder_blocks"] == 24 * block_flops(50, 1024, 4.0)
    assert flops["decoder_blocks"] == 8 * block_flops(197, 512, 4.0)
    # Hand count of one ViT-L block on 50 tokens: 24 N D^2 + 4 N^2 D.
    assert block_flops(50, 1024, 4.0) == 24 * 50 * 1024 ** 2 + 4 * 50 ** 2 * 1024
    assert mae_train_flops_per_image(cfg) == 3 * sum(flops.values())
    # Visible-only encoding is what makes MAE cheap: about 3.4x fewer FLOPs than encoding all 197 tokens.
    full = mae_forward_flops(MAEConfig(encoder=ViTConfig(size="large", patch_size=16), encoder_mask_tokens=True))
    assert 3.0 < full["encoder_blocks"] / flops["encoder_blocks"] < 4.5


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    enc = ViTConfig(size="tiny", image_size=(32, 32), patch_size=4, embed_dim=64, depth=3, num_heads=4,
                    pos_embed="rope2d")
    torch.manual_seed(0)
    model = MAE(MAEConfig(encoder=enc, decoder=DecoderConfig(depth=2, dim=32, num_heads=4)))
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 64)

    def loss_and_grads(checkpointing: bool):
        model.zero_grad()
        set_activation_checkpointing(model, checkpointing)
        loss, _, _ = model(imgs, noise)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_a, grads_a = loss_and_grads(False)
    loss_b, grads_b = loss_and_grads(True)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("pos_embed, image, patch", [("learned", (32, 32), 4), ("sincos2d", (24, 40), 8)])
def test_vit_classifier_flops_equal_counted_matrix_products(explicit_attention, pos_embed, image, patch):
    """The fine-tuned classifier (one head) and the DeiT student (distillation token, two heads). (RoPE's
    attention always runs fused SDPA, whose products the counter does not see on the CPU.)"""
    from pipeline.models.classifier import ViTClassifier
    from pipeline.models.deit import DistilledViT
    from pipeline.models.flops import vit_forward_flops
    from pipeline.models.vit import ViTEncoder

    enc = ViTConfig(size="tiny", image_size=image, patch_size=patch, embed_dim=64, depth=3, num_heads=4,
                    pos_embed=pos_embed)
    imgs = torch.randn(3, 3, *image)
    for model, cfg, heads in ((ViTClassifier(ViTEncoder(enc), 10, "avg"), enc, 1),
                              (DistilledViT(ViTEncoder(dst := ViTConfig(**{**enc.__dict__, "distill_token": True})),
                                            10, "both"), dst, 2)):
        with FlopCounterMode(display=False) as counter:
            model.eval()(imgs)
        assert counter.get_total_flops() == 3 * sum(vit_forward_flops(cfg, 10, heads).values()), type(model)


def test_measured_flops_of_a_timm_cnn_are_three_forwards():
    from pipeline.exports.timm_classifier import build_timm
    from pipeline.models.flops import measured_train_flops_per_image

    cnn = build_timm("resnet10t", 10, 3)
    with FlopCounterMode(display=False) as counter:
        cnn.eval()(torch.zeros(1, 3, 32, 32))
    assert measured_train_flops_per_image(cnn.train(), (3, 32, 32)) == 3 * counter.get_total_flops() > 0
    assert cnn.training  # left as it was


def test_every_run_logs_images_per_s_tflops_and_mfu(fmnist_shards, tmp_path):
    """perf/mfu = model FLOPs per image x images/s per device / trainer.peak_tflops, at each logging step."""
    from conftest import tiny_overrides
    from mlflow import MlflowClient

    from pipeline.recipe import load_recipe
    from pipeline.stages.train import train

    recipe = load_recipe("mae/tiny_fmnist", tiny_overrides(fmnist_shards, tmp_path, **{
        "trainer.max_steps": 6, "trainer.log_every_n_steps": 2, "trainer.peak_tflops": 0.002,
        "checkpoint.enabled": "false", "tracking.recon_every_n_steps": 0}))
    result = train(recipe, resume="none")
    client = MlflowClient(recipe.tracking.uri)
    history = {k: {m.step: m.value for m in client.get_metric_history(result.run_id, k)}
               for k in ("perf/images_per_s", "perf/tflops_per_device", "perf/mfu")}
    assert len(history["perf/mfu"]) == 3  # one window per logging step: steps 2, 4 and 6
    flops = mae_train_flops_per_image(recipe.model)
    for step, mfu in history["perf/mfu"].items():
        tflops = history["perf/tflops_per_device"][step]
        assert tflops == pytest.approx(flops * history["perf/images_per_s"][step] / 1e12)  # one device
        assert mfu == pytest.approx(tflops / 0.002)
    line = next(x for x in result.summary.lines if x.startswith("throughput: "))
    assert "TFLOP/s per device, MFU " in line and "of 0.002 TFLOP/s" in line


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.0), ("NVIDIA H100 PCIe", "bf16-mixed", 756.0),
    ("NVIDIA H200", "bf16-true", 989.0), ("NVIDIA A100-SXM4-80GB", "16-mixed", 312.0),
    ("NVIDIA A100-SXM4-80GB", "32-true", 19.5), ("NVIDIA B200", "bf16-mixed", 2250.0),
    ("NVIDIA B200", "32-true", None), ("NVIDIA GeForce RTX 4090", "bf16-mixed", None)])
def test_peak_tflops_by_device_name(name, precision, peak):
    from pipeline.tracking.throughput import peak_tflops

    assert peak_tflops(name, precision) == peak
