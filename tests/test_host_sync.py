"""A training step that does not log reads nothing back from the device (on a GPU each such read,
``aten::_local_scalar_dense``, would stall the host until the device caught up) and hands Lightning no value.
Profiled on the real training path (Lightning loop, our callbacks, the MLflow logger, checkpointing on), on CPU."""
from __future__ import annotations

import lightning as L
import pytest
from conftest import tiny_overrides

from pipeline.recipe import load_recipe
from pipeline.stages.train import train
from pipeline.tracking.step_profile import StepProfile

pytestmark = pytest.mark.slow


class LogCalls(L.Callback):
    """The names the trained module passes to ``self.log`` while training (validation left out)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log = pl_module.log

        def counted(name: str, *args, **kwargs):
            if trainer.training:
                self.names.append(name)
            return log(name, *args, **kwargs)
        pl_module.log = counted


def describe(reads) -> str:
    return "\n".join(" <- ".join(chain[:3]) + "\n    " + "\n    ".join(stack[:8]) for chain, stack in reads)


@pytest.mark.parametrize("recipe", ["mae/tiny_fmnist", "deit/tiny_fmnist"])
def test_a_step_that_does_not_log_makes_no_host_sync(recipe, fmnist_shards, tmp_path):
    # log every 5 steps, checkpoint every 4: step 2 (the third) does neither
    overrides = tiny_overrides(fmnist_shards, tmp_path, **{"trainer.max_steps": 4, "trainer.log_every_n_steps": 5})
    if recipe.startswith("deit"):  # the student's encoder has no decoder keys
        overrides = {k: v for k, v in overrides.items() if not k.startswith("model.")}
        overrides.update({"model.encoder.image_size": "[16, 16]", "model.encoder.patch_size": "4",
                          "model.encoder.depth": "2", "model.encoder.embed_dim": "64", "model.encoder.num_heads": "4"})
    probe, logs = StepProfile(first=2), LogCalls()
    train(load_recipe(recipe, overrides), resume="none", extra_callbacks=[probe, logs])
    # no step of this run logs: each self.log call would cost the host time for a value Lightning drops
    assert set(logs.names) <= {"data/skipped_samples"}, logs.names  # that one: at the epoch's end
    reads = probe.scalar_reads()
    assert reads, "the profile saw no scalar read at all: it did not cover an optimizer step"  # the fused kernel's
    syncs = probe.host_syncs()
    assert not syncs, f"{len(syncs)} host syncs in a step that does not log:\n{describe(syncs)}"
