"""Lightning's DeepSpeed strategy, also on CPU processes (tests, laptops) with the real ZeRO engine over gloo.

Stock Lightning refuses DeepSpeed unless the accelerator is CUDA, validates CUDA device indices, and hands
``deepspeed.initialize`` the root device's index, which is None for ``cpu``. DeepSpeed itself runs on its
CPU accelerator. The overrides below touch private Lightning methods: pyproject pins Lightning's minor range.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.strategies.deepspeed import _validate_device_index_selection

from ..checkpoint.shared_fs import folder_owner
from ..checkpoint.state import DEEPSPEED_TAG
from ..tasks.optim import skips_by_found_inf
from . import zero_host, zero_sync
from .reshard import UNIVERSAL_TAG, ensure_universal, repair_stage3_universal_load, saved_world_size

log = logging.getLogger(__name__)


class ZeroStrategy(DeepSpeedStrategy):
    """``device_skips``: the training guard skips non-finite steps on the device, so ZeRO (1, 2 and 3) in bf16 is
    set to step without its own checks, and without reading anything back to the host (``zero_sync``)."""

    strategy_name = "vitpipe_deepspeed"

    def __init__(self, *args: Any, device_skips: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.device_skips = device_skips

    @property
    def _on_cuda(self) -> bool:
        return isinstance(self.accelerator, CUDAAccelerator)

    def setup_environment(self) -> None:
        if self._on_cuda:
            return super().setup_environment()
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's "CUDA only" check

    def setup_distributed(self) -> None:
        assert self.parallel_devices is not None
        if self._on_cuda:
            _validate_device_index_selection(self.parallel_devices)
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self._device_rank()), config=self.config, model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()), optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False)
        zero_host.install(engine.optimizer)  # ZeRO-1/2: less host work per step
        if self.device_skips and skips_by_found_inf(optimizer):  # the guard's check can take DeepSpeed's place
            zero_sync.install(engine.optimizer)
        return engine, ds_optimizer

    def _device_rank(self) -> int | None:
        # A CUDA device has an index; a CPU process is told its local rank instead of None.
        index = self.root_device.index
        return self.local_rank if index is None else index

    def save_checkpoint(self, checkpoint, filepath, storage_options=None):
        """As Lightning's, except that each rank writes under its own ``filepath`` instead of rank 0's: the same
        folder on a shared filesystem, its node's folder when the nodes share none (checkpoint.mirror).

        A rank whose write fails (a full disk, a quota) still goes through every collective of DeepSpeed's save,
        then raises: DeepSpeed's save holds barriers between the ranks' writes, and a rank that left it early
        would leave the others waiting in one until the process group's timeout."""
        if storage_options is not None:
            raise TypeError("storage_options is not supported by DeepSpeed checkpoints")
        client_state = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        engine = self.deepspeed_engine
        with _writes_deferring_errors(engine.checkpoint_engine) as failures:
            try:
                engine.save_checkpoint(filepath, client_state=client_state, tag=DEEPSPEED_TAG,
                                       exclude_frozen_parameters=self.exclude_frozen_parameters)
            except OSError as err:  # rank 0's own small writes ('latest', the recovery scripts) after the last
                failures.append(err)  # collective but the closing barrier, which this one stands in for
                self.barrier("deepspeed-save-end")
        if failures:
            raise failures[0]

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        """Loads on the world size that saved it as DeepSpeed does; on another one, through the universal format
        (weights, Adam moments and step repartitioned over the new ranks). Each rank reads its own path."""
        path = Path(checkpoint_path)
        resharded = False
        if path.is_dir() and not self.load_full_weights:
            saved = saved_world_size(path)
            if saved != self.world_size:
                if folder_owner(self, path.parent):  # once per copy of the folder (per node without a shared FS)
                    ensure_universal(path)
                self.barrier("universal-checkpoint")
                log.warning("checkpoint %s was written by %d processes, resuming on %d", path, saved,
                            self.world_size)
                self.deepspeed_engine._config.load_universal_checkpoint = resharded = True
        client_state = super().load_checkpoint(checkpoint_path, weights_only)
        if resharded and self.zero_stage_3:
            repair_stage3_universal_load(self.deepspeed_engine.optimizer, path / UNIVERSAL_TAG)
        return client_state


@contextmanager
def _writes_deferring_errors(checkpoint_engine: Any) -> Iterator[list[OSError]]:
    """Within: the DeepSpeed checkpoint engine's file writes and folder creations record an OSError in the list
    yielded instead of raising it, and the writes after it are skipped (the folder is discarded anyway)."""
    failures: list[OSError] = []

    def deferring(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if failures:
                return None
            try:
                return method(*args, **kwargs)
            except OSError as err:
                failures.append(err)
                return None
        return call

    checkpoint_engine.save = deferring(checkpoint_engine.save)  # instance attributes shadow the class's
    checkpoint_engine.makedirs = deferring(checkpoint_engine.makedirs)
    try:
        yield failures
    finally:
        del checkpoint_engine.save, checkpoint_engine.makedirs
