"""Training options that act on a model's transformer blocks, whatever the objective: activation
checkpointing of every k-th block, and regional compilation (each block compiled on its own).

Regional compilation compiles the block, not the model: the blocks of a stack are alike, so one compiled
graph serves all of them (parameters are graph inputs) and compile time stays that of one block, while the
code around them (MAE's masking gather, the heads, the loss) stays eager. ``nn.Module.compile`` compiles in
place, so parameter names, state dicts and checkpoints are those of the eager model.
"""
from __future__ import annotations

from torch import nn

from .vit import ViTBlock, ViTEncoder


def set_activation_checkpointing(model: nn.Module, every: int | bool) -> int:
    """Recompute every ``every``-th block in the backward (0 / False: none; True: every block) in each ViT
    encoder of ``model`` (an MAE's decoder follows its encoder). Returns how many encoders were set."""
    encoders = [m for m in model.modules() if isinstance(m, ViTEncoder)]
    for encoder in encoders:
        encoder.grad_checkpointing = int(every)
    return len(encoders)


def compile_blocks(model: nn.Module) -> int:
    """Compile each transformer block of ``model`` in place (``torch.compile`` per block); returns how many."""
    blocks = [m for m in model.modules() if isinstance(m, ViTBlock)]
    for block in blocks:
        block.compile()
    return len(blocks)


def compile_refusal(strategy: str, zero_stage: int) -> str | None:
    """Why ``trainer.compile`` is not applied under this strategy, or None when it is."""
    if strategy == "deepspeed" and zero_stage == 3:
        return ("trainer.compile is not applied under ZeRO-3: DeepSpeed gathers each partitioned weight in "
                "forward hooks that a compiled block would trace through; training runs eager")
    return None
