"""MAE's masking noise is generated on the training device in one pass, from one seed per sample: the same
numbers on any device (integer arithmetic), for a sample whatever batch, rank or step it lands in."""
from __future__ import annotations

import torch

from pipeline.models import DecoderConfig, MAEConfig, ViTConfig
from pipeline.tasks import MAEPretrainTask, Schedule
from pipeline.tasks.config import OptimConfig
from pipeline.tasks.mae import counter_uniform

M = (1 << 64) - 1


def splitmix64_uniform(seed: int, n: int) -> list[float]:
    """The reference: splitmix64 on Python's unbounded integers, masked to 64 bits; top 24 bits / 2^24."""
    out = []
    for j in range(1, n + 1):
        z = (seed + j * 0x9E3779B97F4A7C15) & M
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        out.append(((z ^ (z >> 31)) >> 40) / (1 << 24))
    return out


def test_counter_uniform_is_splitmix64_and_uniform():
    seeds = [0, 1, 123456789, (1 << 63) - 1, 1 << 62]
    got = counter_uniform(torch.tensor(seeds, dtype=torch.int64), 9)
    assert [row.tolist() for row in got] == [splitmix64_uniform(s, 9) for s in seeds]
    u = counter_uniform(torch.arange(2000, dtype=torch.int64) * 7919, 196)  # [2000, 196]
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.005
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.005


def test_a_sample_is_masked_alike_in_any_batch():
    enc = ViTConfig(size="tiny", image_size=(16, 16), patch_size=4, embed_dim=32, depth=1, num_heads=2)
    task = MAEPretrainTask(MAEConfig(encoder=enc, decoder=DecoderConfig(depth=1, dim=16, num_heads=2)),
                           OptimConfig(), Schedule(total_steps=10, warmup_steps=1, effective_batch=4, seed=3))
    a = task.masking_noise(["s/1", "s/2", "s/3"], torch.device("cpu"))
    b = task.masking_noise(["s/3", "s/9"], torch.device("cpu"))
    assert a.shape == (3, 16) and torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])
