"""The data layer with real files: shards, manifests, the epoch order, the streaming loader and transforms.

Real tar files, real PIL decoding and real DataLoader worker processes; nothing is mocked. Everything is
small enough to run in a few seconds on two CPU cores.
"""
from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.data import ManifestError, ShardStream, StreamConfig, StreamLoader, TransformConfig, load_manifest
from pipeline.data.decode import decode_image
from pipeline.data.manifest import FORMAT
from pipeline.data.order import EpochOrder, Layout
from pipeline.data.sharding import index_shards
from pipeline.data.sources import FMNIST_CLASSES, FMNIST_DIR, FashionMNISTSource
from pipeline.data.tar_io import iter_raw_samples, sha256_of
from pipeline.data.transforms import TrainTransform, crop_box
from pipeline.stages.shard import shard_fashion_mnist, shard_image_folder


def quiet(_: str) -> None:
    pass


# ----------------------------------------------------------------------------------------------- helpers


def noise_image(rng: np.random.Generator, size=(20, 16), mode="RGB") -> Image.Image:
    w, h = size
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode)


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def read_all(manifest) -> list[dict]:
    return [s for url in manifest.shard_urls() for s in iter_raw_samples(url)]


def stream_key(url: str, key: str) -> str:
    """The key ShardStream gives a sample: '<shard file name without .tar>/<sample key>'."""
    return f"{Path(url).name.rsplit('.tar', 1)[0]}/{key}"


def make_stream(manifest, batch_size: int, *, seed: int = 0, shuffle: bool = True, interleave: int = 32,
                num_workers: int = 2, image_size=(16, 16), repeats: int = 1, offsets: bool = True) -> ShardStream:
    """``offsets``: read runs by ranged requests (the manifest's offsets), else shards from their start."""
    cfg = StreamConfig(shuffle=shuffle, interleave=interleave, num_workers=num_workers,
                       transform=TransformConfig(image_size=image_size), repeats=repeats)
    return ShardStream(manifest.shard_urls(), [s.num_samples for s in manifest.shards], cfg, batch_size, seed,
                       offsets=manifest.offsets_urls() if offsets else None)


def take(loader: StreamLoader, limit: int | None = None) -> list[dict]:
    """Iterate ``loader`` (at most ``limit`` batches), closing the iterator so worker processes shut down."""
    out = []
    it = iter(loader)
    try:
        for batch in it:
            out.append(batch)
            if limit is not None and len(out) == limit:
                break
    finally:
        it.close()
    return out


def keys_of(batches: list[dict]) -> list[list[str]]:
    return [b["key"] for b in batches]


# ------------------------------------------------------------------------------------ sharding round trip


@pytest.fixture
def image_tree(tmp_path):
    """A small ImageNet-style tree with train/ and val/, PNG and JPEG files, and corrupt images.

    Returns (root, expected) where expected[split][key] = (ext, original bytes, label), plus the
    corrupt source paths per split.
    """
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    classes = ["cat", "dog", "eel"]  # train classes; val lacks "dog" so indices must follow train's list
    expected: dict[str, dict[str, tuple[str, bytes, int]]] = {"train": {}, "val": {}}
    corrupt: dict[str, list[str]] = {"train": [], "val": []}
    for split, per_class in (("train", 4), ("val", 2)):
        for label, cls in enumerate(classes):
            if split == "val" and cls == "dog":
                continue
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                fmt, ext = ("PNG", "png") if i % 2 == 0 else ("JPEG", "jpg")
                data = encode(noise_image(rng, size=(12 + i, 10 + 2 * i)), fmt)
                (d / f"{cls}{i}.{ext}").write_bytes(data)
                expected[split][f"{cls}/{cls}{i}"] = (ext, data, label)
    # A dot in the stem: WebDataset would split the key there, so the sharder must not keep it.
    data = encode(noise_image(rng, size=(9, 7)), "JPEG")
    (root / "train" / "dog" / "img.v2.jpeg").write_bytes(data)
    expected["train"]["dog/img_v2"] = ("jpg", data, 1)
    # Unreadable images: garbage behind a .jpg name, and a JPEG cut in half.
    bad = root / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all")
    corrupt["train"].append(str(bad))
    whole = encode(noise_image(rng, size=(64, 64)), "JPEG")
    cut = root / "val" / "eel" / "cut.jpg"
    cut.write_bytes(whole[: len(whole) // 2])
    corrupt["val"].append(str(cut))
    return root, expected, corrupt, classes


def check_split(manifest, out_dir: Path, expected: dict, classes: list[str]) -> None:
    loaded = load_manifest(str(out_dir))
    assert loaded.to_json() == manifest.to_json()
    assert loaded.classes == classes
    assert loaded.num_samples == len(expected)
    assert len(loaded.shards) > 1
    got = {}
    for info, url in zip(loaded.shards, loaded.shard_urls()):
        assert Path(url).parent == out_dir
        assert sha256_of(url) == (info.sha256, info.bytes) and info.bytes == Path(url).stat().st_size
        samples = list(iter_raw_samples(url))
        assert len(samples) == info.num_samples
        for s in samples:
            assert s["__key__"] not in got, f"duplicate key {s['__key__']}"
            images = [k for k in s if k in ("jpg", "png")]
            assert len(images) == 1
            got[s["__key__"]] = (images[0], s[images[0]], int(s["cls"]))
    assert got == expected  # exactly the original bytes, under the right key and class index


def test_shard_image_folder_train_val_round_trip(image_tree, tmp_path):
    root, expected, corrupt, classes = image_tree
    out = tmp_path / "shards"
    manifests = shard_image_folder(str(root), str(out), shard_size=3, workers=2, log=quiet)
    assert sorted(manifests) == ["train", "val"]
    for split in ("train", "val"):
        m = manifests[split]
        assert m.split == split
        assert m.skipped == corrupt[split]  # the unreadable source is listed ...
        check_split(m, out / split, expected[split], classes)  # ... and absent from the shards
        assert all(1 <= s.num_samples <= 3 for s in m.shards)
    raw = json.loads((out / "train" / "manifest.json").read_text())
    assert raw["format"] == FORMAT and raw["num_samples"] == len(expected["train"])
    assert raw["classes"] == classes and raw["skipped"] == corrupt["train"]
    assert not list(out.rglob("*.partial"))


def test_shard_flat_folder_with_holdout(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "flat"
    originals = {}
    for label, cls in enumerate(["ant", "bee"]):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            fmt, ext = ("PNG", "png") if i % 3 else ("JPEG", "jpg")
            data = encode(noise_image(rng, size=(8, 8)), fmt)
            name = f"x.{i}" if i == 4 else f"im{i}"  # one stem with a dot
            (root / cls / f"{name}.{ext}").write_bytes(data)
            originals[f"{cls}/{name.replace('.', '_')}"] = (ext, data, label)
    bad = root / "bee" / "zz_corrupt.jpg"
    bad.write_bytes(b"GIF89a-but-not-really")
    n_items = len(originals) + 1

    out = tmp_path / "out"
    manifests = shard_image_folder(str(root), str(out), shard_size=4, workers=2, holdout=0.25, seed=3, log=quiet)
    train, val = manifests["train"], manifests["val"]
    assert train.classes == val.classes == ["ant", "bee"]
    assert train.skipped + val.skipped == [str(bad)]
    n_val = round(n_items * 0.25)
    assert val.num_samples + len(val.skipped) == n_val
    assert train.num_samples + len(train.skipped) == n_items - n_val

    got = {}
    for m in (train, val):
        for s in read_all(load_manifest(str(out / m.split))):
            ext = "png" if "png" in s else "jpg"
            assert s["__key__"] not in got  # train and val are disjoint
            got[s["__key__"]] = (ext, s[ext], int(s["cls"]))
    assert got == originals

    # The held-out split is deterministic for a seed.
    shard_image_folder(str(root), str(tmp_path / "again"), shard_size=4, workers=1, holdout=0.25, seed=3,
                       log=quiet)
    assert ([s["__key__"] for s in read_all(load_manifest(str(tmp_path / "again" / "val")))]
            == [s["__key__"] for s in read_all(load_manifest(str(out / "val")))])
    # holdout 0 keeps everything for training
    only = shard_image_folder(str(root), str(tmp_path / "only"), shard_size=50, workers=1, log=quiet)
    assert sorted(only) == ["train"] and only["train"].num_samples == len(originals)


def test_shard_folder_keys_collide(tmp_path):
    rng = np.random.default_rng(2)
    d = tmp_path / "imgs" / "cls"
    d.mkdir(parents=True)
    (d / "a.png").write_bytes(encode(noise_image(rng), "PNG"))
    (d / "a.jpg").write_bytes(encode(noise_image(rng), "JPEG"))
    (d / "b.png").write_bytes(encode(noise_image(rng), "PNG"))
    try:
        m = shard_image_folder(str(tmp_path / "imgs"), str(tmp_path / "out"), workers=1, log=quiet)["train"]
    except ValueError:
        return  # refusing colliding keys at sharding time would be fine too
    samples = read_all(load_manifest(str(tmp_path / "out" / "train")))
    assert len(samples) == m.num_samples == 3
    assert len({s["__key__"] for s in samples}) == 3


def test_returned_manifest_locates_its_shards(tmp_path):
    m = shard_fashion_mnist(str(tmp_path / "fm"), shard_size=10, workers=1, limit=20, log=quiet)["train"]
    assert all(Path(u).is_file() for u in m.shard_urls()), m.shard_urls()


def test_shard_fashion_mnist_with_limit(tmp_path):
    out = tmp_path / "fm"
    manifests = shard_fashion_mnist(str(out), shard_size=20, workers=2, limit=50, log=quiet)
    assert sorted(manifests) == ["train", "val"]
    for split in ("train", "val"):
        m = load_manifest(str(out / split))
        assert m.digest() == manifests[split].digest()
        assert m.split == split and m.num_samples == 50
        assert [s.num_samples for s in m.shards] == [20, 20, 10]
        assert m.classes == FMNIST_CLASSES and m.image_ext == "png" and m.skipped == []
        source = FashionMNISTSource(FMNIST_DIR, split, limit=50)
        samples = read_all(m)
        assert [s["__key__"] for s in samples] == [f"fmnist-{split}-{i:06d}" for i in range(50)]
        for i in (0, 21, 49):
            img = Image.open(io.BytesIO(samples[i]["png"]))
            assert img.size == (28, 28) and img.mode == "L"
            assert np.array_equal(np.asarray(img), source.images[i])
            assert int(samples[i]["cls"]) == int(source.labels[i])
        for info, url in zip(m.shards, m.shard_urls()):
            assert sha256_of(url) == (info.sha256, info.bytes)


# ------------------------------------------------------------------------------------ index + manifests


def write_foreign_shards(folder: Path, sizes: list[int], seed: int = 0) -> tuple[list[str], dict]:
    """Shards written with webdataset.TarWriter directly, as another tool would."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    urls, content = [], {}
    for n, size in enumerate(sizes):
        url = str(folder / f"part-{n:03d}.tar")
        with wds.TarWriter(url) as sink:
            for i in range(size):
                key = f"p{n}_{i:03d}"
                data = encode(noise_image(rng, size=(10, 10)), "PNG")
                sink.write({"__key__": key, "png": data, "cls": str(i % 2).encode()})
                content[key] = data
        urls.append(url)
    return urls, content


def test_index_foreign_shards_and_load_back(tmp_path):
    folder = tmp_path / "foreign"
    urls, content = write_foreign_shards(folder, [5, 3, 7])
    m = index_shards(urls, str(folder), "train", classes=["even", "odd"], log=quiet)
    assert m.num_samples == 15 and [s.num_samples for s in m.shards] == [5, 3, 7]
    assert m.image_ext == "png" and m.classes == ["even", "odd"]
    for info, url in zip(m.shards, urls):
        assert sha256_of(url) == (info.sha256, info.bytes)
    for where in (str(folder), str(folder / "manifest.json"), str(folder) + "/"):
        loaded = load_manifest(where)
        assert loaded.to_json() == m.to_json()
        assert loaded.shard_urls() == urls
    assert {s["__key__"]: s["png"] for s in read_all(load_manifest(str(folder)))} == content


def test_index_relative_shard_paths(tmp_path, monkeypatch):
    write_foreign_shards(tmp_path / "shards", [4, 2])
    monkeypatch.chdir(tmp_path)
    index_shards(["shards/part-000.tar", "shards/part-001.tar"], "shards", "train", log=quiet)
    m = load_manifest("shards")
    assert all(Path(u).is_file() for u in m.shard_urls()), m.shard_urls()
    assert len(read_all(m)) == 6


def test_load_manifest_errors_name_the_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ManifestError, match=str(missing)):
        load_manifest(str(missing))
    assert isinstance(ManifestError("x"), ValueError)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"format": "vitpipe.shards/1", "shards": [')
    with pytest.raises(ManifestError, match="not valid JSON") as err:
        load_manifest(str(bad))
    assert str(bad / "manifest.json") in str(err.value)

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something/else", "split": "train", "shards": []}))
    with pytest.raises(ManifestError, match=str(other)):
        load_manifest(str(other))

    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"format": FORMAT, "split": "train", "shards": []}))
    with pytest.raises(ManifestError, match="no shards"):
        load_manifest(str(empty))

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"format": FORMAT, "shards": [{"url": "a.tar", "num_samples": 1}]}))
    with pytest.raises(ManifestError, match=str(broken)):
        load_manifest(str(broken))


# ------------------------------------------------------------------------------------------- epoch order


SIZES = (300, 300, 300, 300, 300, 300, 200)


def rank_positions(order: EpochOrder, layout: Layout, rank: int, consumed: int = 0, steps: int | None = None,
                   ) -> list[tuple[int, int]]:
    """(shard, position) of every sample ``rank`` gets after ``consumed`` positions (``steps`` batches)."""
    out = []
    for step in range(layout.steps(order.total, consumed) if steps is None else steps):
        shards, pos = order.positions(layout.batch_start(consumed, step, rank), layout.batch_size)
        out.extend(zip(shards.tolist(), pos.tolist()))
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_order_split_disjoint_and_complete(world_size):
    batch = 7  # 2000 % (W * 7) != 0 for W = 1..4: there is always a leftover to drop
    total = sum(SIZES)
    everything = {(s, i) for s, n in enumerate(SIZES) for i in range(n)}
    dropped_by_epoch = []
    for epoch in range(4):
        order = EpochOrder(SIZES, seed=11, epoch=epoch, interleave=3)
        full = list(zip(*(a.tolist() for a in order.positions(0, total))))
        assert set(full) == everything and len(full) == total  # the epoch's order: every position once
        layout = Layout(world_size, batch)
        nb = layout.steps(total, 0)
        assert nb == total // (world_size * batch)
        used: set[tuple[int, int]] = set()
        for rank in range(world_size):
            pos = rank_positions(order, layout, rank)
            assert len(pos) == nb * batch == len(set(pos))
            assert used.isdisjoint(pos), rank
            used.update(pos)
        dropped = everything - used
        assert set(full[-len(dropped):]) == dropped  # what is left is the order's tail
        assert 0 < len(dropped) < world_size * batch
        dropped_by_epoch.append(frozenset(dropped))
    assert len(set(dropped_by_epoch)) == len(dropped_by_epoch), "the same samples are dropped every epoch"


def test_order_reads_each_shard_in_runs_and_depends_on_nothing_but_seed_epoch_and_shards():
    order = EpochOrder(SIZES, seed=5, epoch=2, interleave=4)
    for start in range(0, order.total - 50, 37):
        shards, pos = order.positions(start, 50)
        runs = order.runs(start, 50)
        assert len(runs) <= 2 * 4  # at most the shards of the (two) spans it touches
        for run in runs:  # a shard's positions in any stretch are one contiguous run, in tar order
            assert pos[shards == run.shard].tolist() == list(range(run.start, run.stop))
    assert EpochOrder(SIZES, 5, 2, interleave=4).positions(100, 300)[1].tolist() == \
        order.positions(100, 300)[1].tolist()
    plain = EpochOrder(SIZES, seed=5, epoch=2, shuffle=False)
    shards, pos = plain.positions(0, plain.total)
    assert shards.tolist() == [s for s, n in enumerate(SIZES) for _ in range(n)]
    assert pos.tolist() == [i for n in SIZES for i in range(n)]


@pytest.mark.parametrize("before, after", [((2, 8), (1, 8)), ((1, 8), (3, 8)), ((4, 8), (2, 12)), ((2, 8), (2, 5))])
def test_order_after_a_layout_change_deals_out_only_the_unseen(before, after):
    """World size and per-device batch change mid-epoch: the rest continues from one number, no divisibility."""
    order = EpochOrder((300, 300, 250, 170), seed=7, epoch=3, interleave=2)
    first, then = Layout(*before), Layout(*after)
    seen = [p for r in range(first.world_size) for p in rank_positions(order, first, r, steps=11)]
    assert len(seen) == first.world_size * 11 * first.batch_size == len(set(seen))
    consumed = 11 * first.step_size
    assert set(seen) == set(zip(*(a.tolist() for a in order.positions(0, consumed))))  # a prefix of the order
    rest = [p for r in range(then.world_size) for p in rank_positions(order, then, r, consumed)]
    assert not set(rest) & set(seen) and len(rest) == len(set(rest))
    assert order.total - then.step_size < len(seen) + len(rest) <= order.total


def batch_entropy(labels: np.ndarray, batch: int) -> float:
    """Mean entropy (nats) of the label distribution of consecutive batches of ``labels``."""
    out = []
    for i in range(0, len(labels) - batch + 1, batch):
        p = np.bincount(labels[i: i + batch], minlength=10) / batch
        out.append(-(p[p > 0] * np.log(p[p > 0])).sum())
    return float(np.mean(out))


def test_batches_mix_classes_when_each_shard_holds_one():
    """Fashion-MNIST written one class per shard (60 shards of 1,000): the default order, world 2, batch 64,
    gives batches nearly as mixed as a full random permutation. (Which worker makes a batch does not change
    its samples, so the loader's worker count plays no part.)"""
    labels = FashionMNISTSource(FMNIST_DIR, "train").labels
    shard_class = np.repeat(np.arange(10), 6)  # 6,000 images per class: six shards each
    assert np.bincount(labels, minlength=10).tolist() == [6000] * 10
    order, layout = EpochOrder((1000,) * 60, seed=0, epoch=0, interleave=StreamConfig().interleave), Layout(2, 64)
    delivered = np.array([shard_class[s] for r in range(2) for s, _ in rank_positions(order, layout, r)])
    ours = batch_entropy(delivered, 64)
    reference = batch_entropy(np.random.default_rng(0).permutation(np.repeat(np.arange(10), 6000)), 64)
    # the earlier order: each rank a contiguous stretch of the shards (rotated by a random offset), permuted
    # within windows of 1,000
    sequence = np.repeat(shard_class[np.random.default_rng(0).permutation(60)], 1000)
    stretch = np.roll(sequence, -int(np.random.default_rng(1).integers(60000)))[:30000]
    windows = np.concatenate([np.random.default_rng(i).permutation(stretch[i: i + 1000])
                              for i in range(0, len(stretch), 1000)])
    before = batch_entropy(windows, 64)
    print(f"batch label entropy / a full permutation's: this order {ours / reference:.3f}, "
          f"the earlier windowed order {before / reference:.3f}")
    assert ours >= 0.95 * reference


# ------------------------------------------------------------------------------------------- the stream


@pytest.fixture(scope="module")
def fmnist_train(fmnist_shards):
    m = load_manifest(str(fmnist_shards / "train"))
    all_keys = [stream_key(url, s["__key__"]) for url in m.shard_urls() for s in iter_raw_samples(url)]
    assert len(all_keys) == len(set(all_keys)) == 2000
    return m, set(all_keys)


def test_repeated_augmentation_gives_each_sample_k_copies_and_keeps_ranks_balanced(fmnist_train):
    manifest, all_keys = fmnist_train
    batch, world, k = 20, 2, 3
    runs, where = [], {}  # where[key] -> [(rank, rank batch (= step), place in the batch)]
    for rank in range(world):
        ds = make_stream(manifest, batch, seed=3, repeats=k)
        ds.rank, ds.world_size = rank, world
        loader = StreamLoader(ds, num_workers=2, epoch_fn=lambda: 0)
        assert len(loader) == 2000 * k // (world * batch) == 150
        runs.append(take(loader))
        for i, b in enumerate(runs[-1]):  # rank batch i comes from worker i % 2, its (i // 2)-th batch
            for pos, key in enumerate(b["key"]):
                where.setdefault(key, []).append((rank, i, pos))
    assert [len(r) for r in runs] == [150, 150]  # every rank the same number of batches
    assert set(where) == all_keys and all(len(v) == k for v in where.values())  # 6000 = 2000 x 3: none dropped
    # the copies of a sample are near each other in the order: in the same optimizer step or the next
    steps = [[i for _, i, _ in v] for v in where.values()]  # rank batch i is step i on every rank
    assert max(max(st) - min(st) for st in steps) <= 1
    # each copy augmented differently
    images = {}
    for run in runs:
        for b in run:
            for key, img in zip(b["key"], b["image"]):
                images.setdefault(key, []).append(img)
    key = next(iter(images))
    assert not torch.equal(images[key][0], images[key][1]) and not torch.equal(images[key][1], images[key][2])


def test_stream_two_ranks_disjoint_deterministic(fmnist_train):
    manifest, all_keys = fmnist_train
    batch, world = 32, 2
    epoch = [0]

    def loader_for(rank: int) -> StreamLoader:
        ds = make_stream(manifest, batch, seed=5, offsets=rank == 0)  # both ways of reading give the same
        ds.rank, ds.world_size = rank, world
        return StreamLoader(ds, num_workers=2, epoch_fn=lambda: epoch[0])

    loaders = [loader_for(r) for r in range(world)]
    nb = len(loaders[0])
    assert nb == 2000 // (world * batch) == 31
    runs = [take(ld) for ld in loaders]
    assert [len(r) for r in runs] == [nb, nb]
    seen: list[set[str]] = []
    for run in runs:
        keys = [k for b in run for k in b["key"]]
        assert len(keys) == len(set(keys)) == nb * batch, "a key repeats within a rank"
        seen.append(set(keys))
        for b in run:
            assert b["image"].shape == (batch, 3, 16, 16) and b["image"].dtype == torch.uint8  # standardised later
            assert len(b["erase"]) == batch and all(len(row) == 5 for row in b["erase"])  # host ints
            assert b["label"].shape == (batch,) and b["label"].dtype == torch.long
            assert 0 <= int(b["label"].min()) and int(b["label"].max()) < 10
            assert b["skipped"] == 0
    assert seen[0].isdisjoint(seen[1])
    union = seen[0] | seen[1]
    assert len(union) == nb * world * batch and union <= all_keys
    assert loaders[0].skipped == 0

    again = take(loaders[0])  # the same epoch again: same samples, same order, same augmentation
    assert keys_of(again) == keys_of(runs[0])
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(again, runs[0]))

    epoch[0] = 1
    next_epoch = take(loaders[0])
    assert len(next_epoch) == nb
    assert keys_of(next_epoch) != keys_of(runs[0])
    assert [k for b in next_epoch for k in b["key"]] != [k for b in runs[0] for k in b["key"]]
    assert loaders[0].epoch == 1


@pytest.mark.parametrize("num_workers,k,repeats", [(0, 5, 1), (2, 3, 1), (2, 8, 1), (2, 7, 3)])
def test_stream_resume_matches_uninterrupted(fmnist_train, num_workers, k, repeats):
    manifest, _ = fmnist_train
    batch = 64

    def fresh() -> StreamLoader:
        # 300-sample shards, 4 of them per span: a resume starts mid-span, mid-run.
        ds = make_stream(manifest, batch, seed=9, interleave=4, num_workers=num_workers, repeats=repeats)
        return StreamLoader(ds, num_workers=num_workers, epoch_fn=lambda: 0)

    full = take(fresh())
    assert len(full) == 2000 * repeats // batch
    first = fresh()
    head = take(first, limit=k)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batches"] == k and state["samples"] == k * batch
    assert keys_of(head) == keys_of(full[:k])

    resumed = fresh()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip (checkpoint metadata)
    tail = take(resumed)
    assert keys_of(tail) == keys_of(full[k:])
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(tail, full[k:]))
    assert resumed.batches == len(full)
    # a finished epoch resumes at the start of the next one
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["samples"] == 0


@pytest.mark.parametrize("before, after", [((1, 64, 2), (1, 64, 0)), ((2, 32, 2), (2, 48, 1)),
                                           ((2, 32, 1), (3, 24, 2))], ids=["workers", "batch", "world+batch"])
def test_stream_layout_change_continues_the_epoch_without_repeats(fmnist_train, caplog, before, after):
    """Resumed with another worker count, per-device batch or world size (world, batch, workers): the rest of
    the epoch is what the first layout had not delivered, continued from the one position it saved."""
    manifest, _ = fmnist_train

    def loaders(world: int, batch: int, workers: int) -> list[StreamLoader]:
        out = []
        for rank in range(world):
            ds = make_stream(manifest, batch, seed=9, interleave=4, num_workers=workers)
            ds.rank, ds.world_size = rank, world
            out.append(StreamLoader(ds, num_workers=workers, epoch_fn=lambda: 0))
        return out

    first = loaders(*before)
    seen = [k for ld in first for keys in keys_of(take(ld, limit=5)) for k in keys]
    state = first[0].state_dict()
    assert state["samples"] == 5 * before[0] * before[1] and state["batches"] == 5

    changed = loaders(*after)
    with caplog.at_level(logging.INFO, logger="pipeline.data.stream"):
        for ld in changed:
            ld.load_state_dict(json.loads(json.dumps(state)))
    said = [r.getMessage() for r in caplog.records if r.name == "pipeline.data.stream"]
    assert len(said) == after[0] and "data layout changed" in said[0] and "after its first" in said[0]
    rest = [take(ld) for ld in changed]
    seen += [k for run in rest for keys in keys_of(run) for k in keys]
    assert len(seen) == len(set(seen))  # nothing twice within the epoch
    # all of it but what one step cannot hold at the end (as every epoch drops)
    assert manifest.num_samples - after[0] * after[1] < len(seen) <= manifest.num_samples
    assert len({len(r) for r in rest}) == 1  # every rank the same number of batches
    assert len(changed[0]) == 5 + len(rest[0])  # the training loop's count for the epoch runs on, not from zero
    assert changed[0].state_dict()["epoch"] == 1  # and the epoch ends where the loop expects


def test_a_checkpoint_of_the_earlier_order_reads_its_epoch_again_and_says_so(fmnist_train, caplog):
    manifest, _ = fmnist_train
    ds = make_stream(manifest, 64, seed=9)
    loader = StreamLoader(ds, num_workers=0, epoch_fn=lambda: 2)
    earlier = {"epoch": 2, "consumed": 7, "phases": [], "skipped": 1,
               "plan": {"shards": [300] * 6 + [200], "seed": 9, "world_size": 1, "batch_size": 64,
                        "num_workers": 2, "shuffle": True, "shuffle_buffer": 1000}}
    with caplog.at_level(logging.WARNING, logger="pipeline.data.stream"):
        loader.load_state_dict(earlier)
    assert "written by the earlier sample order" in caplog.text and "seen twice" in caplog.text
    assert len(loader) == 7 + 2000 // 64  # the loop has counted 7 batches; the whole epoch follows them
    assert len(take(loader)) == 2000 // 64


def test_runs_are_read_with_ranged_requests_of_their_own_bytes(fmnist_train):
    """Streaming stays streaming: bytes fetched <= 1.1x the tar bytes of the samples delivered (their headers
    included), and a batch reads at most ``interleave`` shards, one ranged request each."""
    from pipeline.data.tar_io import read_offsets

    manifest, _ = fmnist_train
    offsets = [read_offsets(u) for u in manifest.offsets_urls()]
    ds = make_stream(manifest, 64, seed=4, interleave=3, num_workers=0)
    ds.rank, ds.world_size = 1, 2
    name_to_shard = {Path(u).name.rsplit(".tar", 1)[0]: i for i, u in enumerate(manifest.shard_urls())}
    index = {}  # key -> its bytes in the tar
    for i, url in enumerate(manifest.shard_urls()):
        for j, sample in enumerate(iter_raw_samples(url)):
            index[stream_key(url, sample["__key__"])] = int(offsets[i][j + 1] - offsets[i][j])
    batches = take(StreamLoader(ds, num_workers=0, epoch_fn=lambda: 0))
    delivered = sum(index[k] for b in batches for k in b["key"])
    assert delivered > 0 and ds.bytes_read <= 1.1 * delivered, (ds.bytes_read, delivered)
    for b in batches:
        assert len({name_to_shard[k.split("/")[0]] for k in b["key"]}) <= 2 * 3  # a batch may cross two spans


def test_uint8_crosses_the_process_boundary_and_the_device_standardises_as_the_host_did(fmnist_train):
    """Workers ship uint8 (a quarter of float32's bytes) and the erase boxes they drew; the training process's
    DeviceNormalise then gives bitwise what the whole host transform gives for the same sample."""
    from pipeline.data.datamodule import ShardDataModule
    from pipeline.data.decode import open_image
    from pipeline.data.stream import image_bytes

    manifest, _ = fmnist_train
    tcfg = TransformConfig(image_size=(16, 16), random_erase=0.5)
    ds = make_stream(manifest, 32, seed=2)
    ds.cfg = StreamConfig(shuffle=True, num_workers=2, transform=tcfg)
    ds.transform = TrainTransform(tcfg)
    (batch,) = take(StreamLoader(ds, num_workers=2, epoch_fn=lambda: 0), limit=1)
    assert batch["image"].dtype == torch.uint8
    assert batch["image"].numel() * batch["image"].element_size() == 32 * 3 * 16 * 16  # bytes per batch
    assert 0 < sum(row[2] > 0 for row in batch["erase"]) < 32  # some samples erased, some not (p = 0.5)

    dm = ShardDataModule.__new__(ShardDataModule)
    dm.transform = TrainTransform(tcfg)
    out = dm.on_after_batch_transfer(dict(batch), 0)
    assert out["image"].dtype == torch.float32 and "erase" not in out
    samples = {stream_key(u, s["__key__"]): s for u in manifest.shard_urls() for s in iter_raw_samples(u)}
    host = TrainTransform(tcfg)
    for key, x in zip(batch["key"], out["image"]):
        expected = host(open_image(image_bytes(samples[key])), random.Random(f"2/0/{key}"))
        assert torch.equal(x, expected), key


# ------------------------------------------------------------------------------------- corrupt samples


def write_mixed_shard(path: Path, n: int, bad: dict[int, bytes]) -> tuple[dict[str, int], list[str]]:
    """n samples, of which the indices in ``bad`` carry the given broken png bytes. Returns labels, bad keys."""
    rng = np.random.default_rng(7)
    labels, bad_keys = {}, []
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            key = f"s{i:03d}"
            data = bad[i] if i in bad else encode(noise_image(rng, size=(24, 24)), "PNG")
            sink.write({"__key__": key, "png": data, "cls": str(i % 3).encode()})
            if i in bad:
                bad_keys.append(key)
            else:
                labels[key] = i % 3
    return labels, bad_keys


@pytest.mark.parametrize("shuffle", [False, True])
def test_stream_skips_and_counts_corrupt_samples(tmp_path, shuffle):
    good_png = encode(noise_image(np.random.default_rng(3), size=(32, 32)), "PNG")
    truncated = good_png[: len(good_png) // 2]
    with pytest.raises(Exception):
        decode_image(truncated)  # the precondition: these bytes really do not decode
    bad = {5: b"\x89PNG\r\n\x1a\n definitely not image data", 17: truncated}
    folder = tmp_path / "mixed"
    folder.mkdir()
    labels, bad_keys = write_mixed_shard(folder / "mixed-000000.tar", 24, bad)
    m = index_shards([str(folder / "mixed-000000.tar")], str(folder), "train", log=quiet)
    assert m.num_samples == 24  # the tar itself is fine: the damage is inside two samples

    batch = 4
    ds = make_stream(load_manifest(str(folder)), batch, seed=1, shuffle=shuffle)
    loader = StreamLoader(ds, num_workers=2, epoch_fn=lambda: 0)
    batches = take(loader)
    assert len(batches) == 6
    got: dict[str, int] = {}
    for b in batches:
        assert b["image"].shape[0] == len(b["key"]) == b["label"].shape[0] == batch - b["skipped"]
        for key, y in zip(b["key"], b["label"].tolist()):
            got[key.split("/", 1)[1]] = y
    assert got == labels  # every good sample, with its label; no bad one
    assert sum(b["skipped"] for b in batches) == loader.skipped == len(bad_keys) == 2
    if not shuffle:
        # Without shuffling batch j of the plan holds samples 4j..4j+3: the two bad ones are in different
        # batches, each of which is one image short.
        short = sorted({int(k.split("/s")[1]) // batch for b in batches if b["skipped"] for k in b["key"]})
        assert short == [5 // batch, 17 // batch]
        assert all(b["skipped"] in (0, 1) for b in batches)
    assert loader.state_dict()["skipped"] == 2


def test_stream_survives_truncated_tar(tmp_path):
    folder = tmp_path / "cut"
    folder.mkdir()
    tar = folder / "cut-000000.tar"
    labels, _ = write_mixed_shard(tar, 24, {})
    index_shards([str(tar)], str(folder), "train", log=quiet)  # manifest made from the intact shard
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])

    readable = []
    with pytest.raises(Exception):
        for s in iter_raw_samples(str(tar)):
            readable.append(s["__key__"])
    assert 0 < len(readable) < 24

    batch = 4
    ds = make_stream(load_manifest(str(folder)), batch, seed=2, shuffle=True)
    loader = StreamLoader(ds, num_workers=2, epoch_fn=lambda: 0)
    batches = take(loader)  # no exception
    assert len(batches) == 6
    keys = [k.split("/", 1)[1] for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(readable)
    for b in batches:
        assert b["image"].shape == (batch - b["skipped"], 3, 16, 16)
    assert loader.skipped == sum(b["skipped"] for b in batches) == 24 - len(readable)


# ------------------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (224, 224), (100, 60), (64, 64), (28, 28), (17, 23)])
@pytest.mark.parametrize("scale,ratio", [((0.2, 1.0), (3 / 4, 4 / 3)), ((0.08, 0.5), (0.5, 2.0))])
def test_crop_box_inside_and_within_bounds(size, scale, ratio):
    width, height = size
    area = width * height
    rng = random.Random(f"{size}{scale}")
    for _ in range(400):
        left, top, w, h = crop_box(width, height, scale, ratio, rng)
        assert 0 < w and 0 < h
        assert 0 <= left and 0 <= top and left + w <= width and top + h <= height
        # w and h are the rounded sides of a box of the drawn area: allow for that half-pixel rounding
        assert (w + 0.5) * (h + 0.5) / area >= scale[0]
        assert (w - 0.5) * (h - 0.5) / area <= scale[1]
        assert (w + 0.5) / (h - 0.5) >= ratio[0] and (w - 0.5) / (h + 0.5) <= ratio[1]


def test_mae_transform_seeded_and_shaped():
    cfg = TransformConfig(image_size=(16, 12))
    t = TrainTransform(cfg)
    img = noise_image(np.random.default_rng(4), size=(40, 30))
    a = t(img, random.Random("seed/0/key"))
    b = t(img, random.Random("seed/0/key"))
    c = t(img, random.Random("seed/1/key"))
    assert a.shape == (3, 16, 12) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # normalised with the ImageNet statistics: a white image maps to (1 - mean) / std everywhere
    white = t(Image.new("RGB", (30, 30), (255, 255, 255)), random.Random(0))
    expect = (1 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    assert torch.allclose(white, expect.view(3, 1, 1).expand(3, 16, 12), atol=1e-5)


def test_rand_augment_and_random_erasing_are_seeded_per_sample():
    img = noise_image(np.random.default_rng(7), size=(48, 40))
    plain = TrainTransform(TransformConfig(image_size=(32, 32)))
    ra = TrainTransform(TransformConfig(image_size=(32, 32), rand_augment="rand-m9-mstd0.5-inc1"))
    outs = [ra(img, random.Random(f"s/0/k{i}")) for i in range(8)]
    assert all(torch.equal(o, ra(img, random.Random(f"s/0/k{i}"))) for i, o in enumerate(outs))  # reproducible
    changed = [not torch.equal(o, plain(img, random.Random(f"s/0/k{i}"))) for i, o in enumerate(outs)]
    assert sum(changed) >= 6  # two ops at magnitude ~9 rarely leave an image as it was

    erase = TrainTransform(TransformConfig(image_size=(32, 32), random_erase=1.0))
    for i in range(20):
        a, b = plain(img, random.Random(i)), erase(img, random.Random(i))  # same crop and flip, then the box
        diff = (a != b).any(dim=0)
        rows, cols = diff.any(dim=1).nonzero().flatten(), diff.any(dim=0).nonzero().flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert diff[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # one solid rectangle
        assert diff.sum() == h * w and 0.02 * 1024 * 0.7 <= h * w <= 1024 / 3 * 1.2
    with pytest.raises(ValueError, match="rand_augment 'rand-x9'"):
        TransformConfig(rand_augment="rand-x9")
    with pytest.raises(ValueError, match="random_erase 1.5"):
        TransformConfig(random_erase=1.5)


def test_grayscale_bytes_give_three_channels():
    t = TrainTransform(TransformConfig(image_size=(16, 16)))
    gray = noise_image(np.random.default_rng(5), size=(28, 28), mode="L")
    for fmt in ("PNG", "JPEG"):
        img = decode_image(encode(gray, fmt))
        assert img.mode == "RGB"
        x = t(img, random.Random(1))
        assert x.shape == (3, 16, 16)
        assert torch.allclose(x[0] * 0.229 + 0.485, x[1] * 0.224 + 0.456, atol=1e-5)  # grey: equal channels
    with pytest.raises(Exception):
        decode_image(b"\x89PNG\r\n\x1a\n garbage")


def test_mae_transform_accepts_grayscale_pil_image():
    t = TrainTransform(TransformConfig(image_size=(16, 16)))
    gray = noise_image(np.random.default_rng(6), size=(28, 28), mode="L")
    assert t(gray, random.Random(0)).shape == (3, 16, 16)


def test_read_segment_skips_a_truncated_shard_without_retrying(tmp_path):
    """A corrupt object is permanent: its unread samples come back as None at once, no retry waits."""
    from pipeline.data.tar_io import ReadRetry, read_segment, write_shard

    url = str(tmp_path / "s.tar")
    write_shard(url, ({"__key__": f"{i:03d}", "txt": b"x" * 2000} for i in range(10)))
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(data[: len(data) // 2])  # cut inside the 5th or so member
    waits: list[float] = []
    got = list(read_segment(url, 1, 8, ReadRetry(retries=3), sleep=waits.append))
    assert len(got) == 8 and waits == []
    read = [s["__key__"] for s in got if s is not None]
    assert read == [f"{i:03d}" for i in range(1, 1 + len(read))] and 0 < len(read) < 8
    assert all(s is None for s in got[len(read):])
