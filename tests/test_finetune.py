"""Fine-tuning: layer-wise lr decay, the two heads, drop path, and the stage from a registered encoder at
another resolution to a registered classifier."""
from __future__ import annotations

import pytest
import torch
from conftest import mlflow_store, tiny_overrides
from mlflow import MlflowClient

from pipeline.exports.vit import load_classifier
from pipeline.models import ViTConfig, ViTEncoder
from pipeline.models.classifier import ViTClassifier, set_drop_path
from pipeline.objectives.hooks import held_out_top1
from pipeline.recipe import load_recipe
from pipeline.registry import resolve_model
from pipeline.stages.train import train as finetune
from pipeline.stages.train import train as pretrain
from pipeline.tasks.optim import layer_decay_groups


def tiny_classifier(pool: str = "avg") -> ViTClassifier:
    enc = ViTEncoder(ViTConfig(size="tiny", image_size=(16, 16), patch_size=4, embed_dim=32, depth=2, num_heads=2))
    return ViTClassifier(enc, num_classes=5, pool=pool)


def test_layer_decay_scales_lr_by_depth_and_skips_decay_on_norms_and_tokens():
    model = tiny_classifier()
    groups = layer_decay_groups(model, 0.05, 0.5, model.layer_id, num_layers=3)
    scale_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale_of[id(named["encoder.patch_embed.proj.weight"])] == (0.125, 0.05)
    assert scale_of[id(named["encoder.cls_token"])] == (0.125, 0.0)
    assert scale_of[id(named["encoder.blocks.0.attn.qkv.weight"])] == (0.25, 0.05)
    assert scale_of[id(named["encoder.blocks.1.mlp.fc1.bias"])] == (0.5, 0.0)
    assert scale_of[id(named["head.weight"])] == (1.0, 0.05)
    assert scale_of[id(named["fc_norm.weight"])] == (1.0, 0.0)
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_avg_pool_head_replaces_the_final_norm_and_cls_head_keeps_it():
    avg, cls = tiny_classifier("avg"), tiny_classifier("cls")
    assert isinstance(avg.encoder.norm, torch.nn.Identity) and isinstance(avg.fc_norm, torch.nn.LayerNorm)
    assert isinstance(cls.encoder.norm, torch.nn.LayerNorm) and isinstance(cls.fc_norm, torch.nn.Identity)
    x = torch.randn(2, 3, 16, 16)
    tokens = avg.encoder(x)
    torch.testing.assert_close(avg.features(x), avg.fc_norm(tokens[:, 1:].mean(1)))
    assert avg(x).shape == cls(x).shape == (2, 5)


def test_drop_path_rises_linearly_to_the_last_block():
    enc = ViTEncoder(ViTConfig(size="tiny", image_size=(16, 16), patch_size=4, embed_dim=32, depth=3, num_heads=2))
    set_drop_path(enc, 0.2)
    assert isinstance(enc.blocks[0].drop_path1, torch.nn.Identity)
    assert [b.drop_path1.drop_prob for b in enc.blocks[1:]] == pytest.approx([0.1, 0.2])


def test_finetune_from_the_registry_at_another_resolution(fmnist_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VITPIPE_CACHE", str(tmp_path / "cache"))
    uri = mlflow_store(tmp_path)
    pre = load_recipe("mae/tiny_fmnist", tiny_overrides(
        fmnist_shards, tmp_path / "pre", **{"tracking.uri": uri, "register.name": "enc", "register.alias": "x"}))
    pretrained = pretrain(pre, resume="none")
    recipe = load_recipe("finetune/tiny_fmnist", {
        "model.init": "models:/enc@x", "model.image_size": "[24, 24]",  # pretrained at 16 px
        "model.eval_limit": "200", "data.train": str(fmnist_shards / "train"),
        "data.val": str(fmnist_shards / "val"), "trainer.global_batch": "16", "trainer.max_steps": "6",
        "optim.warmup_steps": "2", "checkpoint.dir": str(tmp_path / "ft"), "checkpoint.every_n_steps": "3",
        "tracking.uri": uri, "register.name": "clf", "register.alias": "x"})
    result = finetune(recipe, resume="none")
    assert result.global_step == 6

    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.data.tags["vitpipe.init_run"] == pretrained.run_id
    assert run.data.tags["vitpipe.init_model_version"] == "enc/1"
    # the resolution change is said once and recorded with the run
    line = "sincos2d position embedding resampled: grid 4x4 -> 6x6, sin-cos table recomputed for the new grid"
    assert capsys.readouterr().out.count(f"finetune models:/enc@x: {line}") == 1
    assert run.data.params["model.position_resample"] == line
    top1 = run.data.metrics["val/top1"]
    assert 0.0 <= top1 <= 1.0

    # The registered classifier: positions at 24 px (6 x 6 grid), and the same held-out accuracy.
    ref = resolve_model("models:/clf@x", uri)
    model = load_classifier(ref.folder)
    assert model.encoder.pos_embed.meta()["grid"] == [6, 6]
    assert held_out_top1(model, recipe, recipe.model.eval_crop_pct, recipe.model.eval_limit)[0] == pytest.approx(top1)
    assert float(ref.tags["vitpipe.eval.finetune_top1"]) == pytest.approx(top1, abs=1e-4)


def test_from_scratch_keeps_the_architecture_and_draws_fresh_weights(tmp_path):
    """model.from_scratch: the init model's architecture (and positions) with newly initialised weights, the
    baseline for what the pretraining bought; without it the exported weights are loaded as they are."""
    from pipeline.exports.vit import write_export
    from pipeline.objectives.finetune import classifier
    from pipeline.registry import resolve_model

    torch.manual_seed(1)
    cfg = ViTConfig(size="tiny", image_size=(16, 16), patch_size=4, embed_dim=32, depth=2, num_heads=2,
                    pos_embed="learned")
    pretrained = ViTEncoder(cfg)
    folder = write_export(tmp_path / "enc", pretrained, normalisation={"mean": [0.5] * 3, "std": [0.5] * 3})
    ref = resolve_model(str(folder), f"sqlite:///{tmp_path / 'mlflow.db'}")

    def recipe(scratch: bool):
        return load_recipe("finetune/tiny_fmnist", {"model.init": str(folder), "model.image_size": "[16, 16]",
                                                    "model.from_scratch": scratch})

    loaded = classifier(recipe(False), ref).encoder.state_dict()
    torch.manual_seed(0)
    fresh = classifier(recipe(True), ref).encoder.state_dict()
    torch.manual_seed(0)
    expected = ViTEncoder(cfg).state_dict()  # a fresh init drawn the same way
    want = pretrained.state_dict()
    def shapes(state: dict) -> dict:
        return {k: v.shape for k, v in state.items() if isinstance(v, torch.Tensor)}

    assert shapes(fresh) == shapes(loaded)
    assert fresh["pos_embed._extra_state"] == loaded["pos_embed._extra_state"]  # the same position grid
    for key in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "pos_embed.table"):
        assert torch.equal(loaded[key], want[key]), key
        assert not torch.equal(fresh[key], want[key]), key
        assert torch.equal(fresh[key], expected[key]), key
