"""Block-level training options: selective activation checkpointing and regional compilation (each
transformer block compiled on its own) give the eager model's losses and gradients, keep its parameter names,
and are refused where they cannot work. The 2-process DDP and ZeRO-2 runs are in test_zero.py."""
from __future__ import annotations

import pytest
import torch

from pipeline.models import MAE, DecoderConfig, MAEConfig, ViTConfig, ViTEncoder
from pipeline.models.block_options import compile_blocks, set_activation_checkpointing
from pipeline.models.classifier import ViTClassifier
from pipeline.models.deit import DistilledViT
from pipeline.recipe import load_recipe
from pipeline.stages.train import apply_block_options

TINY = dict(size="tiny", depth=3, embed_dim=64, num_heads=4, image_size=(16, 16), patch_size=4)


def tiny_mae(pos_embed: str) -> MAE:
    torch.manual_seed(0)
    return MAE(MAEConfig(encoder=ViTConfig(**TINY, pos_embed=pos_embed),
                         decoder=DecoderConfig(depth=2, dim=32, num_heads=4)))


def loss_and_grads(model: torch.nn.Module, run) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = run(model)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, tol: float) -> None:
    assert a[0] == pytest.approx(b[0], rel=tol, abs=tol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("every", [1, 2])
def test_checkpointing_every_kth_block_gives_the_same_gradients(every):
    x, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    model = tiny_mae("rope2d")
    want = loss_and_grads(model, lambda m: m(x, noise)[0])
    assert set_activation_checkpointing(model, every) == 1 and model.encoder.grad_checkpointing == every
    assert_same(loss_and_grads(model, lambda m: m(x, noise)[0]), want, 1e-6)


def test_compiled_blocks_equal_eager_for_mae_deit_and_a_classifier():
    """One model per way the blocks are called: MAE with RoPE on kept patches (and checkpointing), a DeiT
    student (two prefix tokens), a fine-tuned classifier; state-dict names stay those of the eager model."""
    x, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    builders = {
        "mae": (lambda: tiny_mae("rope2d"), lambda m: m(x, noise)[0]),
        "deit": (lambda: DistilledViT(ViTEncoder(ViTConfig(**TINY, distill_token=True)), 10),
                 lambda m: sum(h.logsumexp(-1).mean() for h in m.both_logits(x))),
        "classifier": (lambda: ViTClassifier(ViTEncoder(ViTConfig(**TINY, pos_embed="learned")), 10),
                       lambda m: m(x).logsumexp(-1).mean()),
    }
    for name, (build, run) in builders.items():
        torch.manual_seed(0)
        eager = build()
        compiled = build()
        compiled.load_state_dict(eager.state_dict())
        if name == "mae":
            set_activation_checkpointing(compiled, 2)
            set_activation_checkpointing(eager, 2)
        assert compile_blocks(compiled) == len([m for m in compiled.modules() if type(m).__name__ == "ViTBlock"]) > 0
        assert list(compiled.state_dict()) == list(eager.state_dict()), name
        assert_same(loss_and_grads(compiled, run), loss_and_grads(eager, run), 1e-5)


def compiled_blocks(model: torch.nn.Module) -> int:
    return sum(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def test_compile_is_refused_under_zero3_and_said_for_a_model_without_vit_blocks():
    recipe = load_recipe("mae/tiny_fmnist", {"trainer.compile": "true", "trainer.strategy": "deepspeed",
                                             "zero.stage": "3", "trainer.activation_checkpointing": "2"})
    task = torch.nn.Module()
    task.model = tiny_mae("sincos2d")
    with pytest.warns(UserWarning, match="not applied under ZeRO-3"):
        apply_block_options(recipe, task)
    assert compiled_blocks(task.model) == 0 and task.model.encoder.grad_checkpointing == 2
    recipe.zero.stage = 2
    apply_block_options(recipe, task)
    assert compiled_blocks(task.model) == 5  # 3 encoder + 2 decoder blocks

    import timm
    task.model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    with pytest.warns(UserWarning, match="no ViT blocks to compile"):
        apply_block_options(recipe, task)


def test_a_negative_checkpointing_interval_is_refused():
    with pytest.raises(Exception, match="activation_checkpointing"):
        load_recipe("mae/tiny_fmnist", {"trainer.activation_checkpointing": "-1"})
