"""Looking inside a ViT: attention computed explicitly equals the fused training path, the analyses on
hand-built attention, and `vitpipe inspect` on a registered model through a real MLflow server."""
from __future__ import annotations

import csv
import itertools
import math

import pytest
import torch
from conftest import tiny_overrides
from mlflow import MlflowClient
from mlflow_server import mlflow_server  # noqa: F401  (fixture)

from pipeline.inspection.attention import attention_rollout, encoder_attention, mean_attention_distance
from pipeline.models import ViTConfig
from pipeline.models.vit import ViTEncoder, run_blocks


# -- hand-built attention -----------------------------------------------------------------------------------
def test_each_query_attending_to_itself_is_at_distance_zero():
    g, prefix = 4, 1
    t = prefix + g * g
    probs = torch.eye(t).expand(2, 3, t, t)  # [B, H, T, T]
    assert torch.equal(mean_attention_distance(probs, (g, g), 16, prefix), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("prefix", [1, 2])
def test_uniform_attention_gives_the_grids_mean_pairwise_distance(prefix):
    g, patch = 3, 8
    t = prefix + g * g
    probs = torch.full((1, 2, t, t), 1.0 / t)  # uniform over every token, prefix tokens included
    centres = [((r + 0.5) * patch, (c + 0.5) * patch) for r in range(g) for c in range(g)]
    pairs = [math.dist(a, b) for a, b in itertools.product(centres, centres)]
    want = sum(pairs) / len(pairs)  # the prefix's share is left out and the rest renormalised: uniform again
    got = mean_attention_distance(probs, (g, g), patch, prefix)
    assert got.tolist() == pytest.approx([want, want], rel=1e-12)


def test_two_layer_rollout_by_hand():
    a1 = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    a2 = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    b1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]])
    probs = [torch.stack([a1, b1])[None], torch.stack([a2, a2])[None]]  # [1, 2 heads, 3, 3] per layer
    a1, a2, b1, eye = a1.double(), a2.double(), b1.double(), torch.eye(3, dtype=torch.float64)
    l1 = 0.5 * (a1 + b1) / 2 + 0.5 * eye  # rows already sum to 1
    l2 = 0.5 * a2 + 0.5 * eye
    torch.testing.assert_close(attention_rollout(probs)[0], l2 @ l1, rtol=0, atol=1e-7)  # (float32 inputs)


# -- explicit attention = the fused path ------------------------------------------------------------------------
@pytest.mark.parametrize("pos, distill, compiled", [("learned", False, False), ("sincos2d", True, False),
                                                    ("rope2d", False, False), ("rope2d", True, True)])
def test_explicit_attention_gives_the_fused_paths_block_outputs(pos, distill, compiled):
    from pipeline.models.block_options import compile_blocks

    torch.manual_seed(0)
    enc = ViTEncoder(ViTConfig(size="tiny", image_size=(32, 32), patch_size=8, embed_dim=48, depth=3, num_heads=3,
                               pos_embed=pos, distill_token=distill, layer_scale=0.1)).eval()
    imgs = torch.randn(2, 3, 32, 32)
    outputs, probs = encoder_attention(enc, imgs)
    if compiled:
        compile_blocks(enc)
    with torch.no_grad():
        x, rope = enc.with_prefix(enc.embed_patches(imgs))
        for i, block in enumerate(enc.blocks):
            x = run_blocks(torch.nn.ModuleList([block]), x, rope, enc.num_prefix_tokens)
            torch.testing.assert_close(outputs[i], x, rtol=1e-5, atol=1e-5)
    t = enc.num_prefix_tokens + 16
    assert [p.shape for p in probs] == [(2, 3, t, t)] * 3
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(2, 3, t))


# -- vitpipe inspect -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_inspect_a_registered_model_logs_its_figures_under_the_training_run(mlflow_server, fmnist_shards,  # noqa: F811
                                                                           tmp_path, monkeypatch):
    from pipeline.recipe import load_recipe
    from pipeline.registry import ModelError
    from pipeline.stages.inspect import inspect_model
    from pipeline.stages.train import train
    from pipeline.tracking import TrackingConfig

    monkeypatch.setenv("VITPIPE_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe("mae/tiny_fmnist", tiny_overrides(fmnist_shards, tmp_path, **{
        "tracking.uri": mlflow_server.uri, "tracking.experiment": "inspect", "register.name": "tiny-inspect"}))
    trained = train(recipe, resume="none")
    tracking = TrackingConfig(uri=mlflow_server.uri)
    result = inspect_model("models:/tiny-inspect@candidate", str(fmnist_shards / "val"), n=20, tracking=tracking,
                           out=tmp_path / "figures")

    assert result.images == 20 and result.distances.shape == (2, 4)  # depth 2, 4 heads
    assert ((result.distances > 0) & (result.distances < 16 * math.sqrt(2))).all()  # within a 16 px image
    with (tmp_path / "figures" / "mean_attention_distance.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["layer"], r["head"]) for r in rows] == [(str(la), str(h)) for la in (1, 2) for h in (1, 2, 3, 4)]
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(result.run_id)
    assert run.data.tags["mlflow.parentRunId"] == trained.run_id and run.info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(result.run_id, "inspect")}
    assert logged == {"inspect/mean_attention_distance.csv", "inspect/mean_attention_distance.png",
                      "inspect/attention_maps.png"}
    for name in ("mean_attention_distance.png", "attention_maps.png"):
        assert (tmp_path / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = client.get_metric_history(result.run_id, "mean_attention_distance_px")
    assert [m.step for m in curve] == [1, 2]
    tags = client.get_model_version_by_alias("tiny-inspect", "candidate").tags
    assert float(tags["vitpipe.inspect.mean_distance_last_layer"]) == pytest.approx(
        result.distances[-1].mean().item(), abs=0.01)
    assert tags["vitpipe.inspect.run_id"] == result.run_id

    # a model that is not a ViT is named as such
    from pipeline.exports.timm_classifier import build_timm, write_timm_export

    norm = {"mean": [0.5] * 3, "std": [0.5] * 3}
    write_timm_export(tmp_path / "cnn", "resnet10t", build_timm("resnet10t", 10, 3), 10, 3, (32, 32), norm)
    cnn = tmp_path / "cnn"
    with pytest.raises(ModelError, match="resnet10t.*not a ViT encoder"):
        inspect_model(str(cnn), str(fmnist_shards / "val"), n=4, tracking=tracking)
