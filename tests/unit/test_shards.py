"""Shard prep and readers on real tars with real webdataset."""

import io
import json
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import webdataset as wds

from vitbench.data import demo, prep, shardformat, transforms, validation, wds_loader
from vitbench.data.shardread import Readers, StreamStart

from conftest import info, run_command, tar_samples


def prep_shards(*args):
    return run_command("prep_shards", *args)


def test_round_trip_every_image_once_with_identical_bytes_and_label(imagefolder, tmp_path):
    src = imagefolder / "train"
    prep.prepare(src, tmp_path, "train", name="t", shard_size=3, workers=2, progress=False)
    meta = info(tmp_path)
    classes = sorted(d.name for d in src.iterdir())
    assert meta["classes"] == classes and meta["num_classes"] == len(classes)
    split = meta["splits"]["train"]
    files = sorted(src.glob("*/*.JPEG"))
    assert split["num_samples"] == len(files) == sum(split["shard_lengths"])
    assert split["filenames"] == [f"t-train-{i:04d}.tar" for i in range(len(split["filenames"]))]
    samples = tar_samples(tmp_path)
    assert len(samples) == len(files)
    by_path = {json.loads(s["json"])["path"]: s for s in samples.values()}
    for f in files:
        s = by_path[f"{f.parent.name}/{f.name}"]
        assert s["jpg"] == f.read_bytes()
        assert int(s["cls"]) == classes.index(f.parent.name)
    # shuffled, deterministically by seed: the same seed writes the same order again, another seed another
    order = [s["__key__"] for s in samples.values()]
    assert order != sorted(order)
    for seed, same in ((0, True), (1, False)):
        again = tmp_path / f"seed{seed}"
        prep.prepare(src, again, "train", name="t", shard_size=3, workers=1, seed=seed, progress=False)
        assert (list(tar_samples(again)) == order) is same, seed


def test_timm_wds_reader_reads_our_shards(imagefolder, tmp_path):
    import timm.data

    for split in ("train", "validation"):
        prep.prepare(imagefolder / split, tmp_path, split, name="t", shard_size=5, workers=1, progress=False)
    ds = timm.data.create_dataset("wds/t", root=str(tmp_path), split="validation", is_training=False, batch_size=1)
    labels = [target for _, target in ds]
    assert len(labels) == info(tmp_path)["splits"]["validation"]["num_samples"]
    assert sorted(set(labels)) == list(range(info(tmp_path)["num_classes"]))


def test_bad_files_are_skipped_listed_and_never_abort(imagefolder, tmp_path):
    src = tmp_path / "src"
    subprocess.run(["cp", "-r", str(imagefolder / "train"), str(src)], check=True)
    good = sorted(src.glob("*/*.JPEG"))
    truncated, text = good[0], good[1].with_name("notes.JPEG")
    truncated.write_bytes(truncated.read_bytes()[: len(truncated.read_bytes()) // 2])
    text.write_text("not an image")
    proc = prep_shards("--src", src, "--out", tmp_path / "out", "--split", "train", "--shard-size", "4",
                       "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    skipped = {s["path"] for s in info(tmp_path / "out")["splits"]["train"]["skipped"]}
    expected = {f"{truncated.parent.name}/{truncated.name}", f"{text.parent.name}/{text.name}"}
    assert skipped == expected
    for path in expected:
        assert path in proc.stdout
    assert info(tmp_path / "out")["splits"]["train"]["num_samples"] == len(good) + 1 - 2


def _flat_dir(p: Path) -> Path:
    (p / "flat").mkdir()
    (p / "flat" / "a.JPEG").write_bytes(b"x")
    return p / "flat"


def _empty_dir(p: Path) -> Path:
    (p / "empty").mkdir()
    return p / "empty"


def _an_empty_class(p: Path) -> Path:
    for cls in ("a", "b"):
        (p / "src" / cls).mkdir(parents=True)
    demo.make_imagefolder(p / "tmp", train_per_class=1, val_per_class=0, seed=0)
    shutil.copy(next((p / "tmp" / "train").glob("*/*.JPEG")), p / "src" / "a" / "x.JPEG")
    return p / "src"


def _no_images(p: Path) -> Path:
    (p / "src" / "a").mkdir(parents=True)
    (p / "src" / "a" / "readme.txt").write_text("not an image")
    return p / "src"


@pytest.mark.parametrize("make_src, message", [
    (lambda p: p / "missing", "does not exist"),
    (_empty_dir, "no class folders"),
    (_flat_dir, "no class folders"),
    (_an_empty_class, "class folder(s) with no files: b"),
])
def test_bad_source_is_a_clear_error_before_any_work(tmp_path, make_src, message):
    src = make_src(tmp_path)
    proc = prep_shards("--src", src, "--out", tmp_path / "out", "--split", "train")
    assert proc.returncode == 2
    assert str(src) in proc.stderr and message in proc.stderr
    assert not (tmp_path / "out").exists(), "nothing may be written for bad input"


def test_a_source_with_no_readable_image_is_an_error_not_an_empty_split(tmp_path):
    src = _no_images(tmp_path)
    proc = prep_shards("--src", src, "--out", tmp_path / "out", "--split", "train")
    assert proc.returncode == 2 and "no readable image among 1 file(s) (first: a/readme.txt" in proc.stderr
    assert not (tmp_path / "out" / "_info.json").exists()


@pytest.mark.parametrize("flag", ["--max-side", "--workers", "--shard-size"])
def test_a_non_positive_prep_number_is_one_line(tmp_path, flag):
    proc = prep_shards("--src", tmp_path, "--out", tmp_path / "out", "--split", "train", flag, "-1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and f"{flag}: must be >= 1" in proc.stderr


@pytest.mark.parametrize("content", ["{", "[]", '{"splits": {"train": {"filenames": []}}}'],
                         ids=["truncated", "not_an_object", "incomplete"])
def test_verify_lists_a_malformed_info_file_as_a_problem(tmp_path, content):
    (tmp_path / "_info.json").write_text(content)
    proc = prep_shards("--out", tmp_path, "--split", "train", "--verify")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"FAIL {tmp_path}/_info.json: " in proc.stderr and "re-run the prep" in proc.stderr


def test_half_written_shard_is_rebuilt_and_verify_names_corrupt_shards(imagefolder, tmp_path):
    prep.prepare(imagefolder / "train", tmp_path, "train", name="t", shard_size=5, workers=1, progress=False)
    shards = sorted(tmp_path.glob("*.tar"))
    # A shard truncated after its record was written: verify names it, a re-run rebuilds it.
    shards[1].write_bytes(shards[1].read_bytes()[:1000])
    proc = prep_shards("--out", tmp_path, "--split", "train", "--verify")
    assert proc.returncode == 1 and str(shards[1]) in proc.stderr
    prep.prepare(imagefolder / "train", tmp_path, "train", name="t", shard_size=5, workers=1, progress=False)
    assert prep.verify(tmp_path, "train") == []


def _keys_of(loader):
    keys = []
    for batch in loader:
        assert len(batch["keys"]) == len(batch["labels"]) == batch["images"].shape[0]
        keys += batch["keys"]
    return keys


@pytest.mark.parametrize("world, workers", [(2, 2), (3, 4)], ids=["2x2", "more_readers_than_shards"])
def test_validation_every_sample_exactly_once(demo_shards, world, workers, request):
    val = shardformat.load_split(demo_shards, "validation")
    assert len(set(val.lengths)) > 1, "shards must be uneven for this test"
    if "more_readers" in request.node.name:
        assert world * workers > len(val.urls)
    tf = transforms.eval_transform(32)
    all_keys = []
    for rank in range(world):
        stream = validation.ValidationStream(val, tf, batch_size=4, rank=rank, world_size=world, workers=workers)
        batches = list(validation.validation_loader(stream))
        # what ZeRO-3's lockstep padding counts on: the rank yields exactly the batches computed for it
        assert len(batches) == stream.batches_of_rank(rank)
        all_keys += _keys_of(batches)
    expected = [s["__key__"] for url in val.urls for s in wds.tariterators.tarfile_samples([{"url": url}])]
    assert len(all_keys) == len(expected) == val.num_samples
    assert sorted(all_keys) == sorted(expected)


def test_train_stream_yields_promised_batches_per_rank(demo_shards):
    train = shardformat.load_split(demo_shards, "train")
    tf = transforms.train_transform(32, None)
    for rank in range(2):
        loader = wds_loader.train_loader(train, tf, batch_size=6, micro_batches=5, readers=Readers(rank, 2, 2), seed=0,
                                   start=StreamStart(epoch=0))
        batches = list(loader)
        assert len(batches) == 5
        assert all(b["images"].shape == (6, 3, 32, 32) for b in batches)


def test_max_side_shrinks_only_larger_images(imagefolder, tmp_path):
    from PIL import Image

    prep.prepare(imagefolder / "train", tmp_path, "train", name="t", shard_size=50, workers=1, max_side=400,
                 progress=False)
    for s in tar_samples(tmp_path).values():
        meta = json.loads(s["json"])
        original = (imagefolder / "train" / meta["path"]).read_bytes()
        with Image.open(imagefolder / "train" / meta["path"]) as im:
            w, h = im.size
        if max(w, h) > 400:
            assert max(meta["width"], meta["height"]) == 400 and s["jpg"] != original
            assert Image.open(io.BytesIO(s["jpg"])).size == (meta["width"], meta["height"])
        else:
            assert s["jpg"] == original and (meta["width"], meta["height"]) == (w, h)


def test_train_stream_differs_per_rank_and_epoch_and_repeats_augmentation(demo_shards):
    train = shardformat.load_split(demo_shards, "train")
    tf = transforms.train_transform(32, None)

    def keys(rank, epoch, repeats=1):
        loader = wds_loader.train_loader(train, tf, batch_size=6, micro_batches=3, readers=Readers(rank, 2, 0), seed=0,
                                   start=StreamStart(epoch=epoch), repeats=repeats)
        return _keys_of(loader)

    assert keys(0, 0) == keys(0, 0)  # deterministic
    assert keys(0, 0) != keys(1, 0) and keys(0, 0) != keys(0, 1)
    loader = wds_loader.train_loader(train, tf, batch_size=6, micro_batches=1, readers=Readers(0, 1, 0), seed=0,
                                     start=StreamStart(epoch=0), repeats=3)
    batch = next(iter(loader))
    assert batch["keys"][0] == batch["keys"][1] == batch["keys"][2] != batch["keys"][3]
    assert not (batch["images"][0] == batch["images"][1]).all(), "copies are augmented independently"


def test_corrupt_sample_in_a_shard_is_skipped_counted_and_named(demo_shards, tmp_path):
    """A shard whose second sample's JPEG is garbage: both readers skip it, warn with shard and key."""
    src = shardformat.load_split(demo_shards, "validation")
    bad_shard = tmp_path / "bad-0000.tar"
    samples = list(wds.tariterators.tarfile_samples([{"url": src.urls[0]}]))
    with wds.TarWriter(str(bad_shard)) as tw:
        for i, s in enumerate(samples):
            tw.write({"__key__": s["__key__"], "jpg": b"garbage" if i == 1 else s["jpg"], "cls": s["cls"]})
    shards = shardformat.ShardSet("validation", [str(bad_shard)], [len(samples)], 10)
    stream = validation.ValidationStream(shards, transforms.eval_transform(32), batch_size=4, rank=0, world_size=1, workers=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(validation.validation_loader(stream))
    assert sum(len(b["keys"]) for b in batches) == len(samples) - 1
    assert sum(b["skipped"] for b in batches) == 1
    assert any(str(bad_shard) in str(w.message) and samples[1]["__key__"] in str(w.message) for w in caught)


def _epoch_keys(shards, epoch, world_size, workers, repeats, batch_size=6):
    """Every key the ranks of one epoch train on (each rank reads its part of the split)."""
    tf = transforms.train_transform(16, None)
    steps = shards.num_samples // (batch_size * world_size)
    keys = []
    for rank in range(world_size):
        keys += _keys_of(wds_loader.train_loader(shards, tf, batch_size=batch_size, micro_batches=steps,
                                                 readers=Readers(rank, world_size, workers), seed=0,
                                                 start=StreamStart(epoch=epoch), repeats=repeats))
    return keys


def test_an_epoch_reads_every_shard_once_when_there_are_enough(demo_shards):
    """18 shards over 2 ranks x 2 workers: a permutation per epoch, so an epoch's samples are nearly all
    distinct (only the ends of uneven shares repeat or go unread); resampling with replacement, forced by
    offering only 3 shards to the same 4 readers, gives each of them random shards instead."""
    train = shardformat.load_split(demo_shards, "train")
    assert wds_loader.epoch_sampling(len(train.urls), 2, 2, 1) == wds_loader.PERMUTED
    permuted = _epoch_keys(train, 0, world_size=2, workers=2, repeats=1)
    assert len(permuted) == train.num_samples // 12 * 12
    assert len(set(permuted)) / train.num_samples >= 0.9
    assert _epoch_keys(train, 1, world_size=2, workers=2, repeats=1) != permuted  # a new permutation

    few = shardformat.ShardSet("train", train.urls[:3], train.lengths[:3], train.num_classes)
    assert wds_loader.epoch_sampling(3, 2, 2, 1) == wds_loader.RESAMPLED
    resampled = _epoch_keys(few, 0, world_size=2, workers=2, repeats=1, batch_size=3)
    assert len(resampled) == few.num_samples // 6 * 6
    assert len(set(resampled)) / few.num_samples < len(set(permuted)) / train.num_samples


def _stream_epochs(shards, epochs, steps, workers, repeats, batch_size=6):
    """Keys of EPOCHS consecutive epochs of STEPS batches, all from one loader (as train_vit.py reads them),
    and the loader's worker processes seen at the end of each epoch."""
    import psutil

    tf = transforms.train_transform(16, None)
    it = iter(wds_loader.train_loader(shards, tf, batch_size=batch_size, micro_batches=steps,
                                      readers=Readers(0, 1, workers), seed=0, start=StreamStart(epoch=0),
                                      repeats=repeats, micro_batches_per_epoch=steps))
    me = psutil.Process()
    keys, workers_seen = [], []
    for _ in range(epochs):
        keys.append(_keys_of(next(it) for _ in range(steps)))
        # forked loader workers share this process's command line (other children, e.g. a W&B service, do not)
        workers_seen.append({c.pid for c in me.children() if c.cmdline() == me.cmdline()})
    return keys, workers_seen


def test_one_loader_serves_every_epoch_from_the_same_workers(demo_shards):
    """The train stream outlives an epoch: the same two worker processes make three epochs (an odd
    number of batches each, so the workers take turns starting an epoch), and each epoch is still a
    fresh permutation that reads nearly every sample once."""
    train = shardformat.load_split(demo_shards, "train")
    steps = train.num_samples // 8
    assert steps % 2 == 1
    epochs, workers_seen = _stream_epochs(train, 3, steps, workers=2, repeats=1, batch_size=8)
    assert len(workers_seen[0]) == 2 and workers_seen[0] == workers_seen[1] == workers_seen[2]
    for keys in epochs:
        assert len(keys) == steps * 8 and len(set(keys)) / train.num_samples >= 0.9
    assert epochs[0] != epochs[1] != epochs[2]


def test_repeated_augmentation_spreads_one_pass_over_as_many_epochs(demo_shards):
    """Repeats x3: each epoch reads a third of the shards (each image three times); three epochs together
    read every shard once, like timm's RepeatAugSampler over its epochs. The epochs come from one
    loader, as in training."""
    train = shardformat.load_split(demo_shards, "train")
    assert wds_loader.epoch_sampling(len(train.urls), 1, 2, 3) == wds_loader.PERMUTED
    steps = train.num_samples // 6
    epochs, _ = _stream_epochs(train, 3, steps, workers=2, repeats=3)
    for keys in epochs:
        assert len(set(keys)) <= len(keys) / 3 + 7  # each decoded image yields three samples
    predicted = wds_loader.pass_coverage(train.lengths, 1, 2, 3, 6, steps)
    assert predicted >= 0.97 and len(set().union(*epochs)) / train.num_samples >= predicted - 1e-9


@pytest.mark.parametrize("world, workers, accum", [(8, 16, 2), (16, 12, 1), (16, 16, 1)],
                         ids=["1x8_16workers", "2x8_12workers", "2x8_16workers"])
def test_a_pass_reads_nearly_every_imagenet_image_at_the_cluster_layouts(world, workers, accum):
    """From the layout alone (no image read): prep_shards.py's 1,024 ImageNet shards, the recipe's global
    batch 4096 in micro-batches of 256 and RA x3. Whole shards dealt out per epoch read 83-92% of the images
    per pass at these layouts; equal runs of samples streamed across the pass read >= 99%."""
    lengths = [1252] * 1023 + [1_281_167 - 1252 * 1023]
    assert wds_loader.epoch_sampling(len(lengths), world, workers, 3) == wds_loader.PERMUTED
    assert wds_loader.pass_coverage(lengths, world, workers, 3, 256, 1_281_167 // 4096 * accum) >= 0.99


def test_a_pass_deals_every_sample_to_exactly_one_reader():
    urls, lengths = [f"s{i}.tar" for i in range(10)], [7, 5, 7, 7, 3, 7, 7, 7, 2, 7]
    dealt = [(seg["url"], k) for rank in range(2) for worker in range(3)
             for seg in wds_loader._pass_share(urls, lengths, rank, 2, worker, 3, seed=0, pass_index=0)
             for k in range(seg["first"], seg["end"])]
    assert sorted(dealt) == sorted((u, k) for u, n in zip(urls, lengths) for k in range(n))
    sizes = [sum(seg["end"] - seg["first"] for seg in wds_loader._pass_share(urls, lengths, 0, 1, w, 6, 0, 0))
             for w in range(6)]
    assert max(sizes) - min(sizes) <= 1  # equal runs, whatever the shard sizes
