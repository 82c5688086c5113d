"""Bad samples: MAE trains on samples without a usable label; a task that learns from labels skips and counts
them with the reason; a run stops, naming keys, once more than data.max_bad_fraction of what it was delivered
was bad, on every rank at once. Real tar shards, real loader workers and real short training runs."""
from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import PROGRAM, mlflow_store, tiny_overrides
from mlflow import MlflowClient
from PIL import Image

from pipeline.data import ShardStream, StreamConfig, StreamLoader, TransformConfig, load_manifest
from pipeline.data.bad_samples import BadSampleTally, TooManyBadSamples, judge_bad_samples, too_many_bad
from pipeline.data.sharding import index_shards
from pipeline.recipe import load_recipe
from pipeline.stages.train import train as pretrain
from pipeline.tasks.supervised import drop_unusable_labels

# What a sample of each kind carries besides its image; None: no .cls member at all.
CLS = {"good": None, "nolabel": None, "text": b"cat", "range": b"17", "corrupt": None}
REASON = {"nolabel": "no label (.cls missing)", "text": "label b'cat' is not a class index",
          "range": "label 17 is outside [0, 10)", "corrupt": "corrupt image"}


def png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder: Path, shards: list[list[str]], seed: int = 0) -> dict[str, str]:
    """One tar per list of sample kinds ("good", "nolabel", "text", "range", "corrupt") and their manifest
    (indexed as any shards would be). Returns {stream key: kind}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    kinds, urls = {}, []
    for n, shard in enumerate(shards):
        url = folder / f"part{n}.tar"
        with wds.TarWriter(str(url)) as sink:
            for i, kind in enumerate(shard):
                key = f"{kind}{i:03d}"
                sample = {"__key__": key, "png": b"\x89PNG\r\n\x1a\n broken" if kind == "corrupt" else png(rng)}
                if kind in ("good", "corrupt"):
                    sample["cls"] = str(i % 10).encode()
                elif CLS[kind] is not None:
                    sample["cls"] = CLS[kind]
                sink.write(sample)
                kinds[f"part{n}/{key}"] = kind
        urls.append(str(url))
    index_shards(urls, str(folder), "train", classes=[str(c) for c in range(10)], log=lambda _: None)
    return kinds


def stream(folder: Path, labelled: bool, batch: int = 4, rank: int = 0, world: int = 1,
           shuffle: bool = True) -> StreamLoader:
    m = load_manifest(str(folder))
    cfg = StreamConfig(shuffle=shuffle, interleave=2, num_workers=2, transform=TransformConfig(image_size=(8, 8)))
    ds = ShardStream(m.shard_urls(), [s.num_samples for s in m.shards], cfg, batch, seed=3, labelled=labelled,
                     num_classes=10 if labelled else None)
    ds.rank, ds.world_size = rank, world
    return StreamLoader(ds, num_workers=2, epoch_fn=lambda: 0)


MIXED = [["good", "nolabel", "text", "good", "range", "good", "good", "nolabel"] * 2,
         ["good", "text", "good", "good", "corrupt", "good", "good", "good"] * 2]


# ---------------------------------------------------------------------------------------------- the stream


def test_mae_stream_delivers_samples_without_a_usable_label(tmp_path):
    kinds = write_shards(tmp_path / "s", MIXED)
    loader = stream(tmp_path / "s", labelled=False)
    batches = list(loader)
    delivered = {k: y for b in batches for k, y in zip(b["key"], b["label"].tolist())}
    assert set(delivered) == {k for k, kind in kinds.items() if kind != "corrupt"}  # only the corrupt images go
    for key, y in delivered.items():
        if kinds[key] == "range":
            assert y == 17  # passed along as it is: MAE does not use it
        elif kinds[key] != "good":
            assert y == -1
    assert loader.skipped == 2
    assert sorted(r.split(":")[0] for b in batches for _, r in b["bad"]) == ["corrupt image"] * 2


def test_labelled_stream_skips_and_names_samples_without_a_usable_label(tmp_path):
    kinds = write_shards(tmp_path / "s", MIXED)
    loader = stream(tmp_path / "s", labelled=True)
    batches = list(loader)
    assert len(batches) == 8  # 32 samples, batches of 4: bad ones shorten a batch, never drop one
    delivered = {k for b in batches for k in b["key"]}
    assert delivered == {k for k, kind in kinds.items() if kind == "good"}
    bad = {key: reason for b in batches for key, reason in b["bad"]}
    assert set(bad) == {k for k, kind in kinds.items() if kind != "good"}
    for key, reason in bad.items():
        assert reason.startswith(REASON[kinds[key]]), (key, reason)
    assert loader.skipped == sum(b["skipped"] for b in batches) == len(bad) == 12
    for b in batches:
        assert b["image"].shape[0] == len(b["key"]) == 4 - b["skipped"] == 4 - len(b["bad"])


def test_bad_samples_keep_the_ranks_batch_counts_equal(tmp_path):
    """All bad samples in rank 0's share (no shuffling: each step's 8 samples in tar order, rank 0 takes the
    first 4): both ranks still deliver the same number of batches, rank 0's empty (they take a zero step)."""
    write_shards(tmp_path / "s", [(["nolabel"] * 4 + ["good"] * 4) * 2, (["nolabel"] * 4 + ["good"] * 4) * 2])
    ranks = [list(stream(tmp_path / "s", labelled=True, rank=r, world=2, shuffle=False)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4
    assert all(b["image"].shape[0] == 0 and b["skipped"] == 4 for b in ranks[0])
    assert all(b["image"].shape[0] == 4 and b["skipped"] == 0 for b in ranks[1])


def test_judging_the_fraction():
    cfg = StreamConfig(max_bad_fraction=0.1, bad_grace_samples=100)
    assert not too_many_bad(50, 99, cfg)  # too early to judge
    assert not too_many_bad(10, 100, cfg) and too_many_bad(11, 100, cfg)
    assert not too_many_bad(1000, 1000, StreamConfig(max_bad_fraction=1.0))
    with pytest.raises(TooManyBadSamples, match=r"11 of the 100 samples .* \(11.0%\).* 0.1\. For example "
                                                r"p/k1: no label; p/k2: corrupt image"):
        judge_bad_samples(11, 100, [("p/k1", "no label"), ("p/k2", "corrupt image")], cfg)
    for bad in ({"max_bad_fraction": 1.5}, {"max_bad_fraction": -0.1}, {"bad_grace_samples": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            StreamConfig(**bad)

    tally = BadSampleTally(keep=3)
    for n in range(3):
        tally.add({"image": torch.zeros(2, 3, 4, 4), "skipped": 2, "bad": [(f"k{n}a", "r"), (f"k{n}b", "r")]})
    assert (tally.seen, tally.bad, [k for k, _ in tally.examples]) == (12, 6, ["k0a", "k0b", "k1a"])


def test_task_drops_labels_out_of_its_range_on_the_host():
    """The task's own guard (a stream built without num_classes): out-of-range samples leave the batch and
    join its bad samples instead of stopping the run."""
    batch = {"image": torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2), "label": torch.tensor([1, 12, -1, 0]),
             "key": ["a", "b", "c", "d"], "skipped": 1, "bad": [("z", "corrupt image: x")]}
    out = drop_unusable_labels(batch, num_classes=10)
    assert out["key"] == ["a", "d"] and out["label"].tolist() == [1, 0]
    assert out["image"][:, 0, 0, 0].tolist() == [0.0, 3.0]
    assert out["skipped"] == 3
    assert out["bad"] == [("z", "corrupt image: x"), ("b", "label 12 is outside [0, 10)"), ("c", "no label")]
    assert drop_unusable_labels(out, 10) is out  # nothing to drop: the same batch


# ----------------------------------------------------------------------------------------- training runs


def deit_overrides(shards: Path, work: Path, **extra) -> dict[str, str]:
    """A DeiT student small enough to step in a fraction of a second on CPU, without checkpoints."""
    return {"model.encoder.embed_dim": "32", "model.encoder.depth": "1", "model.encoder.num_heads": "2",
            "model.encoder.image_size": "[16, 16]", "model.encoder.patch_size": "4",
            "data.train": str(shards), "data.val": str(shards), "data.num_workers": "1",
            "trainer.global_batch": "8", "trainer.max_steps": "6", "trainer.log_every_n_steps": "2",
            "optim.warmup_steps": "1", "checkpoint.enabled": "false", "checkpoint.dir": str(work / "ckpt"),
            "tracking.uri": mlflow_store(work), **{k: str(v) for k, v in extra.items()}}


@pytest.mark.slow
def test_mae_run_trains_on_unlabelled_samples(tmp_path):
    kinds = write_shards(tmp_path / "s", [["good", "nolabel", "text", "range"] * 8])
    trace = tmp_path / "trace.jsonl"
    o = tiny_overrides(tmp_path / "s", tmp_path, **{"trainer.max_steps": 4, "trainer.global_batch": 8,
                                                    "trainer.log_every_n_steps": 2, "data.num_workers": 1,
                                                    "data.bad_grace_samples": 0, "data.max_bad_fraction": 0.0,
                                                    "checkpoint.enabled": "false", "trainer.sample_trace": trace})
    o["data.train"] = o["data.val"] = str(tmp_path / "s")
    result = pretrain(load_recipe("mae/tiny_fmnist", o), resume="none")
    assert result.global_step == 4
    seen = [k for line in trace.read_text().splitlines() for k in json.loads(line)["keys"]]
    assert len(seen) == 32 and {kinds[k] for k in seen} == {"good", "nolabel", "text", "range"}
    skipped = MlflowClient(o["tracking.uri"]).get_metric_history(result.run_id, "data/skipped_samples")
    assert skipped and skipped[-1].value == 0


@pytest.mark.slow
def test_labelled_run_counts_bad_samples_and_stops_past_the_fraction(tmp_path):
    # 2 of every 16 samples without a label (12.5 %): within a 20 % budget the run finishes and counts them
    write_shards(tmp_path / "s", [["good"] * 6 + ["nolabel"] + ["good"] * 8 + ["text"]] * 3)
    recipe = load_recipe("deit/tiny_fmnist", deit_overrides(
        tmp_path / "s", tmp_path / "ok", **{"data.max_bad_fraction": 0.2, "data.bad_grace_samples": 8}))
    assert recipe.labelled
    result = pretrain(recipe, resume="none")
    assert result.global_step == 6
    skipped = MlflowClient(f"sqlite:///{tmp_path / 'ok' / 'mlflow.db'}").get_metric_history(
        result.run_id, "data/skipped_samples")
    assert sum(m.value for m in skipped) >= 1

    # the same shards with a 5 % budget: the run stops at a logging step, naming keys and why
    recipe = load_recipe("deit/tiny_fmnist", deit_overrides(
        tmp_path / "s", tmp_path / "stop", **{"data.max_bad_fraction": 0.05, "data.bad_grace_samples": 8,
                                              "data.shuffle": "false", "trainer.max_steps": 20}))
    with pytest.raises(TooManyBadSamples) as err:
        pretrain(recipe, resume="none")
    msg = str(err.value)
    assert "more than data.max_bad_fraction 0.05" in msg
    assert "part0/nolabel006: no label (.cls missing)" in msg


@pytest.mark.slow
def test_ddp_ranks_stop_together_when_only_one_rank_sees_bad_samples(tmp_path, child_env):
    """Without shuffling each step reads 16 samples in tar order, rank 0 the first 8: every other one of them
    is corrupt, rank 1's are all good. The verdict is collective, so both ranks stop (exit 2) and neither
    waits forever in a collective the other left."""
    write_shards(tmp_path / "s", [(["good", "corrupt"] * 4 + ["good"] * 8) * 2, ["good"] * 32])
    o = tiny_overrides(tmp_path / "s", tmp_path, **{
        "trainer.strategy": "ddp", "trainer.devices": 2, "trainer.global_batch": 16, "trainer.max_steps": 4,
        "trainer.log_every_n_steps": 2, "data.num_workers": 1, "data.shuffle": "false",
        "data.max_bad_fraction": 0.1, "data.bad_grace_samples": 16, "checkpoint.enabled": "false"})
    o["data.train"] = o["data.val"] = str(tmp_path / "s")
    flags = [x for k, v in o.items() for x in (f"--{k}", str(v))]
    out = subprocess.run([*PROGRAM, "-m", "pipeline.cli", "pretrain", "--config", "mae/tiny_fmnist", *flags],
                         env=child_env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "8 of the 32 samples delivered so far (25.0%) were bad" in out.stderr
    assert "part0/corrupt001: corrupt image" in out.stderr
