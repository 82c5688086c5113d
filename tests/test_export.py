"""Export a trained checkpoint to safetensors + metadata and load the encoder back, also at another size."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import PROGRAM, tiny_overrides
from safetensors.torch import load_file

from pipeline.exports.vit import load_encoder
from pipeline.models import MAE
from pipeline.recipe import load_recipe

pytestmark = pytest.mark.slow


def test_export_round_trip(fmnist_shards, tmp_path, child_env):
    o = tiny_overrides(fmnist_shards, tmp_path, **{"trainer.max_steps": 3, "model.encoder.pos_embed": "learned",
                                                   "tracking.recon_every_n_steps": 0})
    flags = [x for k, v in o.items() for x in (f"--{k}", str(v))]
    train = subprocess.run([*PROGRAM, "-m", "pipeline.cli", "pretrain", "--config", "mae/tiny_fmnist", *flags],
                           env=child_env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    out = tmp_path / "export"
    exp = subprocess.run([*PROGRAM, "-m", "pipeline.cli", "export", "--checkpoint", str(tmp_path / "ckpt"),
                          "--out", str(out)], env=child_env, capture_output=True, text=True, timeout=600)
    assert exp.returncode == 0, exp.stderr[-3000:]
    assert "step-00000003" in exp.stdout

    meta = json.loads((out / "metadata.json").read_text())
    assert meta["step"] == 3
    assert meta["recipe_hash"] == load_recipe("mae/tiny_fmnist", o).digest()
    assert meta["encoder"]["pos_embed"] == {"kind": "learned", "grid": [4, 4], "num_prefix_tokens": 1, "dim": 64}
    assert meta["encoder"]["patch_size"] == 4 and meta["encoder"]["image_size"] == [16, 16]
    assert meta["normalisation"]["mean"] == [0.286, 0.286, 0.286]
    assert any(k.startswith("decoder_blocks.") for k in load_file(str(out / "mae.safetensors")))

    # Reference: the trained weights read straight from the Lightning checkpoint.
    recipe = load_recipe("mae/tiny_fmnist", o)
    ref = MAE(recipe.model)
    state = torch.load(tmp_path / "ckpt" / "step-00000003" / "state.ckpt", weights_only=False)["state_dict"]
    ref.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    ref.eval()
    encoder = load_encoder(out).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(encoder(x), ref.encoder(x))
        # at 24x16 pixels the 4x4 grid becomes 6x4: positions resampled from the recorded grid
        wide = load_encoder(out, image_size=(24, 16)).eval()
        assert wide.pos_embed.table.shape == (1, 1 + 6 * 4, 64)
        assert wide(torch.randn(2, 3, 24, 16)).shape == (2, 1 + 24, 64)
        assert torch.equal(wide.pos_embed.table[:, 0], encoder.pos_embed.table[:, 0])  # CLS row kept
