"""Bad samples: which labels a task can use, the tally of bad samples a rank saw, and the verdict that stops a
run delivering more than ``data.max_bad_fraction`` of them (taken over all ranks by ``tasks.base``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import StreamConfig


class TooManyBadSamples(ValueError):
    """More than ``data.max_bad_fraction`` of the samples delivered so far were bad; names some and why."""


@dataclass
class BadSampleTally:
    """One rank's delivered and bad samples since its run (or resume) started, and the first few bad ones as
    (key, reason). Counted from what batches carry on the host: no device synchronisation."""

    seen: int = 0
    bad: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)
    keep: int = 5

    def add(self, batch: dict[str, Any]) -> None:
        skipped = int(batch.get("skipped", 0))
        self.seen += batch["image"].shape[0] + skipped
        self.bad += skipped
        room = self.keep - len(self.examples)
        self.examples.extend((str(key), str(reason)) for key, reason in batch.get("bad", [])[:max(room, 0)])


PER_SAMPLE = ("image", "label", "erase", "encoded", "box", "flip")  # a batch's entries with one row per sample


def without_samples(batch: dict[str, Any], reasons: dict[int, str]) -> dict[str, Any]:
    """``batch`` without the samples at the indices of ``reasons``, which join its bad samples ("skipped"
    count, "bad" (key, reason) pairs). Tensors and lists of one entry per sample are filtered alike."""
    if not reasons:
        return batch
    n = len(batch["label"])
    keys = batch.get("key") or [f"#{i}" for i in range(n)]
    kept = [i for i in range(n) if i not in reasons]
    out = {**batch, "key": [keys[i] for i in kept], "skipped": batch.get("skipped", 0) + len(reasons),
           "bad": [*batch.get("bad", []), *((keys[i], reasons[i]) for i in sorted(reasons))]}
    for name in PER_SAMPLE:
        if name in batch:
            value = batch[name]
            out[name] = [value[i] for i in kept] if isinstance(value, list) else value[kept]
    return out


def too_many_bad(bad: int, seen: int, cfg: StreamConfig) -> bool:
    """With at least ``cfg.bad_grace_samples`` delivered, more than ``cfg.max_bad_fraction`` of them bad."""
    return seen > 0 and seen >= cfg.bad_grace_samples and bad > cfg.max_bad_fraction * seen


def judge_bad_samples(bad: int, seen: int, examples: list[tuple[str, str]], cfg: StreamConfig) -> None:
    """Raise TooManyBadSamples, naming ``examples`` (key, reason), when ``too_many_bad``. ``bad`` and ``seen``
    are totals over all ranks."""
    if not too_many_bad(bad, seen, cfg):
        return
    named = "; ".join(f"{key}: {reason}" for key, reason in examples) or "(no keys reached this process)"
    raise TooManyBadSamples(
        f"{bad} of the {seen} samples delivered so far ({bad / seen:.1%}) were bad, more than "
        f"data.max_bad_fraction {cfg.max_bad_fraction:g}. For example {named}. Fix or drop them (re-index the "
        f"shards with `vitpipe shard --index` to find truncated ones), or raise data.max_bad_fraction")


def parse_label(sample: dict[str, Any], num_classes: int | None) -> int:
    """The class index in a sample's ``.cls``; ValueError saying why there is no usable one."""
    if "cls" not in sample:
        raise ValueError("no label (.cls missing)")
    raw = sample["cls"]
    try:
        label = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"label {raw[:20]!r} is not a class index") from None
    if num_classes is not None and not 0 <= label < num_classes:
        raise ValueError(f"label {label} is outside [0, {num_classes})")
    return label


def label_if_any(sample: dict[str, Any]) -> int:
    """A task without labels (MAE) passes a label along when one parses, else -1; never a reason to skip."""
    try:
        return parse_label(sample, None)
    except ValueError:
        return -1
