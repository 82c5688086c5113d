"""Runs the pretrain stage in its own process, optionally killing itself (SIGKILL) mid-run.

Usage: python run_pretrain.py OVERRIDES_JSON [--kill-in-checkpoint-at STEP]
With --kill-in-checkpoint-at the process dies *while writing* the checkpoint of that step, the harshest
point: the checkpoint folder is half written and must never be used by a resume.
"""
from __future__ import annotations

import json
import os
import signal
import sys

import lightning as L

from pipeline.recipe import load_recipe
from pipeline.stages.pretrain import pretrain


class KillWhileSaving(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    overrides = json.loads(sys.argv[1])
    callbacks = []
    if "--kill-in-checkpoint-at" in sys.argv:
        callbacks.append(KillWhileSaving(int(sys.argv[sys.argv.index("--kill-in-checkpoint-at") + 1])))
    pretrain(load_recipe("mae/tiny_fmnist", overrides), resume="auto", extra_callbacks=callbacks)
