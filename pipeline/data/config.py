"""The data configs: where the shards are, how they are streamed, read, augmented, and the object-store
options. Plain dataclasses with no torch, PIL or fsspec import, so a recipe is checked in a fraction of a
second, before the training stack loads."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import IMAGENET_MEAN, IMAGENET_STD, flatten
from ..retry import RetryPolicy
from ..tracking.secrets import ENV_REFERENCE, is_secret_key

# timm's RandAugment spec: "rand" then "-"-separated options m<int>, n<int>, p<float>, mstd<float>, mmax<int>,
# inc<0|1>, t<transform set>. Checked here without importing timm; TrainTransform builds it with timm.
_RAND_AUGMENT = re.compile(r"rand(-(m\d+|n\d+|p[\d.]+|mstd[\d.]+|mmax\d+|inc[01]|t\w+))*")


def check_rand_augment(spec: str) -> None:
    if not _RAND_AUGMENT.fullmatch(spec):
        raise ValueError(f"rand_augment {spec!r} is not a timm RandAugment spec (e.g. rand-m9-mstd0.5-inc1: "
                         "'rand' then options m<magnitude>, n<ops>, mstd<std>, mmax<max>, inc<0|1>, p<prob>)")


@dataclass
class TransformConfig:
    """Training augmentation: RandomResizedCrop + horizontal flip (MAE), optionally RandAugment and random
    erasing (DeiT: ``rand_augment: rand-m9-mstd0.5-inc1``, ``random_erase: 0.25``, ``crop_scale: [0.08, 1]``),
    then normalisation."""

    image_size: tuple[int, int] = (224, 224)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    rand_augment: str | None = None
    """timm's RandAugment spec (e.g. ``rand-m9-mstd0.5-inc1``), applied after crop and flip; None: off."""
    random_erase: float = 0.0
    """Chance of erasing one rectangle (2-33 % of the image, aspect 0.3-3.3) with per-pixel normal noise."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.random_erase <= 1.0:
            raise ValueError(f"random_erase {self.random_erase} is not a probability")
        if self.rand_augment is not None:
            check_rand_augment(self.rand_augment)  # a malformed spec fails when the recipe loads


@dataclass
class ReadRetry(RetryPolicy):
    """How a shard read that fails as if the store were unreachable is retried."""

    retries: int = 6
    """Re-opens of a shard after a transient error (connection refused or reset, timeout, 5xx) before the
    rest of its segment is skipped and counted."""
    backoff_s: float = 1.0
    """Wait before the first retry; doubled for each next one (1 + 2 + 4 + ... s)."""
    block_size: int | None = None
    """Bytes per ranged read from object storage (None: the filesystem's default, 5 MiB for s3)."""


@dataclass
class StreamConfig:
    """Where the training shards are and how they are streamed."""

    train: str = ""
    """Manifest of the training split: a ``manifest.json`` URL or the folder holding it (any fsspec URL)."""
    val: str = ""
    """Manifest of the held-out split (used by evaluation stages)."""
    shuffle: bool = True
    """Permute the shards each epoch and mix the samples of ``interleave`` shards at a time (see
    ``data.order``); off: shards in manifest order, each read whole."""
    interleave: int = 32
    """Shards whose samples an epoch's order mixes together (each spread evenly over the stretch they fill).
    More mixes better when a shard holds few classes; a batch then reads one run from each of up to this
    many shards."""
    shuffle_buffer: int | None = None
    """Not used: the window of the earlier sample order (kept so recipes and checkpoints that name it load)."""
    num_workers: int = 2
    decode: Literal["cpu", "gpu"] = "cpu"
    """Where training JPEGs are decoded: in the loader workers (cpu), or on the training device (gpu: workers
    ship the bytes and the drawn crop; nvJPEG on a GPU, the same code on the CPU). Other images, and JPEGs the
    device decoder refuses, are decoded on the CPU. RandAugment needs cpu."""
    transform: TransformConfig = field(default_factory=TransformConfig)
    read: ReadRetry = field(default_factory=ReadRetry)
    repeats: int = 1
    """Repeated augmentation (DeiT): each sample is delivered this many times per epoch, each copy with its
    own augmentation, the copies next to each other in the worker's stream before the window shuffle (so
    within one or two shuffle windows). An epoch is then ``repeats`` times as many batches."""
    max_bad_fraction: float = 0.01
    """The run stops, naming bad samples and why, once more than this fraction of the samples delivered so
    far were bad (unreadable, undecodable, or without a usable label when the task learns from labels).
    Judged over all ranks together at logging steps and epoch ends; 1 never stops."""
    bad_grace_samples: int = 1000
    """``max_bad_fraction`` is judged only once this many samples were delivered (all ranks together), so a
    few bad samples in the first batches do not stop a run."""

    def __post_init__(self) -> None:
        if self.decode == "gpu" and self.transform.rand_augment:
            raise ValueError("decode: gpu cannot apply transform.rand_augment (RandAugment runs on PIL images in "
                             "the loader workers): use decode: cpu")
        if self.interleave < 1:
            raise ValueError(f"interleave {self.interleave} must be >= 1")
        if self.repeats < 1:
            raise ValueError(f"repeats {self.repeats} must be >= 1")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction {self.max_bad_fraction} is not a fraction in [0, 1]")
        if self.bad_grace_samples < 0:
            raise ValueError(f"bad_grace_samples {self.bad_grace_samples} must be >= 0")


@dataclass
class StorageConfig:
    """fsspec options for object storage, per protocol, applied to every filesystem the run opens, e.g.
    ``s3: {endpoint_url: "${S3_ENDPOINT}", key: "${S3_KEY}", secret: "${S3_SECRET}"}``. A value is literal or
    a ``${NAME}`` reference to an environment variable; secret-looking options must be references."""

    s3: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, value in flatten(self.s3, "s3").items():
            if is_secret_key(key.rsplit(".", 1)[-1]) and not (isinstance(value, str) and ENV_REFERENCE.match(value)):
                raise ValueError(f"{key}: a literal secret in a recipe is refused (recipes are logged and shared); "
                                 f"write a reference to an environment variable such as \"${{S3_SECRET}}\"")
