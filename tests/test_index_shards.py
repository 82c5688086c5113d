"""`vitpipe shard --index` on damaged shards: a tar cut inside a member, or cut at a member boundary (no
end-of-archive blocks, where Python's tarfile and WebDataset stop without a word), gets a manifest with every
shard, the truncated one recorded with its complete samples and the reason; --strict refuses it; training
and evaluation then read exactly the recorded samples. Real tar files, cut with real byte offsets."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.cli import main
from pipeline.data import ManifestError, ShardStream, StreamConfig, StreamLoader, TransformConfig, load_manifest
from pipeline.data.manifest import FORMAT
from pipeline.data.sharding import index_shards
from pipeline.data.tar_io import TruncatedShard, iter_raw_samples
from pipeline.evaluation.features import EvalTransform, LabelledSplit


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, prefix: str, n: int) -> dict[str, tuple[int, int]]:
    """A shard as another tool writes it: per sample ``<key>.png`` then ``<key>.cls``, plain tarfile (GNU
    format). Returns each member's (header offset, end of its padded data)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(n):
            for ext, data in (("png", png(i)), ("cls", str(i % 3).encode())):
                info = tarfile.TarInfo(f"{prefix}{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data + -(-m.size // 512) * 512) for m in tar.getmembers()}


def cut(path: Path, at: int) -> None:
    path.write_bytes(path.read_bytes()[:at])


def webdataset_keys(path: Path) -> list[str]:
    """What WebDataset's own reader makes of a shard."""
    with open(path, "rb") as f:
        return [s["__key__"] for s in group_by_keys({**e, "__url__": str(path)} for e in tar_file_iterator(f))]


@pytest.fixture
def shards(tmp_path) -> dict[str, Path]:
    """Three shards a (6 samples), b (7), c (5) in tmp_path/shards, and their member offsets."""
    folder = tmp_path / "shards"
    folder.mkdir()
    out = {}
    for name, n in (("a", 6), ("b", 7), ("c", 5)):
        path = folder / f"{name}.tar"
        out[name] = path
        out[name + "_members"] = write_tar(path, name, n)
    return out


def index(paths: list[Path], out: Path, **kw):
    lines: list[str] = []
    manifest = index_shards([str(p) for p in paths], str(out), "train", log=lines.append, **kw)
    return manifest, "\n".join(lines)


# ----------------------------------------------------------------------------------------------- index


def test_a_shard_cut_inside_a_member_is_recorded_with_its_complete_samples(shards, tmp_path):
    b = shards["b"]
    start, _ = shards["b_members"]["b004.png"]
    cut(b, start + 512 + 40)  # inside b004.png's data: b000..b003 are whole
    manifest, out = index([shards["a"], b, shards["c"]], tmp_path / "m")
    assert [s.num_samples for s in manifest.shards] == [6, 4, 5]
    assert [s.truncated is None for s in manifest.shards] == [True, False, True]
    reason = manifest.shards[1].truncated
    assert "cut inside member b004.png" in reason and "b004 not counted" in reason
    assert f"{b}: TRUNCATED, 4 complete samples readable" in out and str(b) in out.splitlines()[-1]

    raw = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert raw["num_samples"] == 15
    assert "truncated" not in raw["shards"][0] and raw["shards"][1]["truncated"] == reason
    loaded = load_manifest(str(tmp_path / "m"))
    assert loaded.shards[1].truncated == reason and loaded.to_json() == manifest.to_json()


def test_a_tar_cut_at_a_member_boundary_is_truncated_not_silently_short(shards, tmp_path):
    b = shards["b"]
    _, png_end = shards["b_members"]["b003.png"]
    cut(b, png_end)  # b003.png whole, b003.cls cut off, no end-of-archive blocks
    # the precondition: Python's tarfile and WebDataset read this without an error, b003 without its label
    with tarfile.open(b) as tar:
        assert tar.getnames()[-1] == "b003.png"
    assert webdataset_keys(b) == ["b000", "b001", "b002", "b003"]

    manifest, out = index([shards["a"], b], tmp_path / "m")
    info = manifest.shards[1]
    assert info.num_samples == 3  # b003 (png, no cls) is not a full sample
    assert "without the end-of-archive marker" in info.truncated and "b003 (png)" in info.truncated
    assert f"{b}: TRUNCATED, 3 complete samples readable" in out


def test_a_cut_between_samples_keeps_the_last_whole_sample(shards, tmp_path):
    b = shards["b"]
    cut(b, shards["b_members"]["b003.cls"][1])  # after b003.cls: b000..b003 whole, then nothing
    manifest, _ = index([b], tmp_path / "m")
    assert manifest.shards[0].num_samples == 4
    assert "after member b003.cls, without the end-of-archive marker" in manifest.shards[0].truncated


def test_a_tar_missing_only_its_end_blocks_or_cut_in_a_header(shards, tmp_path):
    b, c = shards["b"], shards["c"]
    last_end = shards["b_members"]["b006.cls"][1]
    cut(b, last_end + 512)  # one of the two zero blocks
    cut(c, shards["c_members"]["c002.png"][0] + 100)  # inside c002.png's header
    manifest, _ = index([b, c], tmp_path / "m")
    assert manifest.shards[0].num_samples == 7 and "inside the end-of-archive marker" in manifest.shards[0].truncated
    assert manifest.shards[1].num_samples == 2 and "inside the next member's header" in manifest.shards[1].truncated


def test_whole_tars_from_tarfile_and_gnu_tar_are_not_truncated(shards, tmp_path):
    manifest, out = index([shards["a"], shards["b"]], tmp_path / "m")
    assert [s.truncated for s in manifest.shards] == [None, None] and "TRUNCATED" not in out
    if shutil.which("tar"):  # the tar command, with its own padding to 10 KiB records
        src = tmp_path / "src"
        src.mkdir()
        for i in range(3):
            (src / f"k{i}.png").write_bytes(png(i))
            (src / f"k{i}.cls").write_text(str(i))
        made = tmp_path / "gnu.tar"
        subprocess.run(["tar", "-cf", str(made), "-C", str(src), *sorted(p.name for p in src.iterdir())],
                       check=True)
        manifest, _ = index([made], tmp_path / "g")
        assert manifest.shards[0].num_samples == 3 and manifest.shards[0].truncated is None


def test_a_file_that_is_no_tar_is_recorded_with_no_samples(shards, tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive" * 40)
    manifest, out = index([shards["a"], junk], tmp_path / "m")
    assert [s.num_samples for s in manifest.shards] == [6, 0]
    assert "not a readable tar archive" in manifest.shards[1].truncated and str(junk) in out


def test_old_manifests_without_the_field_still_load(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": FORMAT, "split": "train", "num_samples": 3,
                               "shards": [{"url": "/x/a.tar", "num_samples": 3, "sha256": "ab", "bytes": 10}]}))
    m = load_manifest(str(old))
    assert m.shards[0].truncated is None and m.truncated_shards() == []
    assert "truncated" not in m.to_json()["shards"][0]  # whole shards serialise (and hash) as before


def test_missing_manifest_names_the_command_that_exists(tmp_path):
    with pytest.raises(ManifestError) as err:
        load_manifest(str(tmp_path / "nowhere"))
    assert "vitpipe shard --index TAR... --out DIR" in str(err.value) and "shard index" not in str(err.value)


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_names_the_truncated_shard_and_strict_refuses_it(shards, tmp_path, capsys):
    b = shards["b"]
    cut(b, shards["b_members"]["b002.png"][0] + 512 + 10)
    args = ["shard", "--index", str(shards["a"]), str(b), str(shards["c"]), "--out", str(tmp_path / "m")]

    assert main([*args, "--strict"]) == 2
    err = capsys.readouterr().err
    assert f"{b}: cut inside member b002.png" in err and "1 of 3 shards truncated" in err
    assert not (tmp_path / "m" / "manifest.json").exists()  # nothing committed

    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{b}: TRUNCATED, 2 complete samples readable" in out
    m = load_manifest(str(tmp_path / "m"))
    assert [s.num_samples for s in m.shards] == [6, 2, 5] and m.shards[1].truncated

    assert main(["shard", "--fashion-mnist", "--out", str(tmp_path / "f"), "--strict"]) == 2
    assert "--strict applies to --index only" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the loader reads the count


@pytest.mark.parametrize("where", ["inside a member", "at a member boundary"])
def test_training_and_evaluation_read_exactly_the_recorded_samples(shards, tmp_path, where):
    b = shards["b"]
    members = shards["b_members"]
    cut(b, members["b004.png"][0] + 512 + 30 if where == "inside a member" else members["b004.png"][1])
    manifest, _ = index([shards["a"], b, shards["c"]], tmp_path / "m")
    assert [s.num_samples for s in manifest.shards] == [6, 4, 5]
    expected = {f"a/a{i:03d}" for i in range(6)} | {f"b/b{i:03d}" for i in range(4)} | {f"c/c{i:03d}" for i in range(5)}

    # the sample read just before the damage is delivered: the reader yields it before touching b004's data
    read = []
    with pytest.raises(TruncatedShard, match=str(b)):
        for sample in iter_raw_samples(str(b)):
            read.append(sample["__key__"])
    assert read == [f"b{i:03d}" for i in range(4)]

    cfg = StreamConfig(shuffle=True, interleave=2, num_workers=2, transform=TransformConfig(image_size=(8, 8)))
    ds = ShardStream(manifest.shard_urls(), [s.num_samples for s in manifest.shards], cfg, batch_size=3, seed=5,
                     labelled=True, num_classes=3)
    loader = StreamLoader(ds, num_workers=2, epoch_fn=lambda: 0)
    batches = list(loader)
    assert len(batches) == 5 and loader.skipped == 0  # 15 samples, 5 batches of 3: none missing, none bad
    assert {k for b_ in batches for k in b_["key"]} == expected

    split = LabelledSplit(str(tmp_path / "m"), EvalTransform((8, 8), (0.5,) * 3, (0.5,) * 3, 1.0), batch_size=4)
    got = list(split)
    assert sum(len(g["label"]) for g in got) == 15 and sum(g["skipped"] for g in got) == 0
