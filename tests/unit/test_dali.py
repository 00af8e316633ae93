"""`--loader dali`: NVIDIA DALI's real pipeline on its CPU operators, over real demo shards."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import webdataset as wds

from vitbench.data import dali_loader, shardformat
from vitbench.data.shardread import Readers

from conftest import BIN, run_command

CPU = torch.device("cpu")


def loader(shards, *, batch_size=6, rank=0, world_size=1, repeats=1, aa=None, seed=0):
    return dali_loader.DaliTrainLoader(shards, 32, aa, batch_size=batch_size, readers=Readers(rank, world_size, 1),
                                       seed=seed, repeats=repeats, device=CPU)


@pytest.mark.parametrize("aa", ["ra", "rand-m9-mstd0.5"])  # FlagPerf's (torchvision's bins), timm's mapped
def test_batches_are_the_default_loaders_uint8_and_repeat_each_image_augmented_apart(demo_shards, aa):
    train = shardformat.load_split(demo_shards, "train")
    batch = next(loader(train, repeats=3, aa=aa).batches(1))
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (6, 3, 32, 32)
    assert all(0 <= int(y) < train.num_classes for y in batch["labels"]) and batch["skipped"] == 0
    keys = batch["keys"]
    assert keys[:2] == keys[2:4] == keys[4:] and keys[0] != keys[1]  # 2 images x 3 copies
    assert batch["labels"][:2].tolist() == batch["labels"][2:4].tolist()
    assert not torch.equal(batch["images"][0], batch["images"][2]), "copies are augmented independently"
    # a batch that is not a multiple of the repeats (the recipe's 256 with x3): 3 images x 3 copies, cut to 8
    odd = next(loader(train, batch_size=8, repeats=3).batches(1))
    assert odd["images"].shape[0] == len(odd["labels"]) == len(odd["keys"]) == 8
    assert odd["keys"][:3] == odd["keys"][3:6] and odd["keys"][6:] == odd["keys"][:2]
    # the key is the sample's own: the demo writes each class's name into its key
    labels_of = {s["__key__"]: int(s["cls"]) for url in train.urls
                 for s in wds.tariterators.tarfile_samples([{"url": url}])}
    assert [labels_of[k] for k in keys] == batch["labels"].tolist()


def test_an_epoch_reads_each_sample_once_across_ranks(demo_shards):
    """DALI's reader splits the split's samples over ranks: one epoch of each rank is disjoint from the
    other's and repeats nothing."""
    train = shardformat.load_split(demo_shards, "train")
    per_rank = train.num_samples // 2
    seen = []
    for rank in range(2):
        keys = [k for b in loader(train, batch_size=5, rank=rank, world_size=2).batches(per_rank // 5)
                for k in b["keys"]]
        assert len(keys) == len(set(keys)) == per_rank // 5 * 5
        seen.append(set(keys))
    assert not seen[0] & seen[1]


def test_index_files_are_dalis_own_format_and_are_used(demo_shards, tmp_path):
    shutil.copytree(demo_shards, tmp_path / "s")
    train = shardformat.load_split(tmp_path / "s", "train")
    assert dali_loader.index_paths(train) is None
    assert run_command("prep_shards", "--out", tmp_path / "s", "--split", "train", "--dali-index").returncode == 0
    reference = tmp_path / "ref.idx"
    subprocess.run([str(BIN / "wds2idx"), train.urls[0], str(reference)], check=True, capture_output=True)
    assert (tmp_path / "s" / (train.urls[0].rsplit("/", 1)[1] + ".idx")).read_text() == reference.read_text()
    assert dali_loader.index_paths(train) == [u + ".idx" for u in train.urls]
    keys = [k for b in loader(train, batch_size=10).batches(train.num_samples // 10) for k in b["keys"]]
    assert len(set(keys)) == len(keys) == train.num_samples // 10 * 10  # read through the index files


def test_bad_label_is_dropped_and_counted_corrupt_jpeg_is_a_clear_error(demo_shards, tmp_path):
    src = shardformat.load_split(demo_shards, "train")
    samples = list(wds.tariterators.tarfile_samples([{"url": src.urls[0]}]))

    def shard(name, change):
        path = tmp_path / name
        with wds.TarWriter(str(path)) as tw:
            for i, s in enumerate(samples):
                tw.write(change(i, {"__key__": s["__key__"], "jpg": s["jpg"], "cls": s["cls"]}))
        return shardformat.ShardSet("train", [str(path)], [len(samples)], 10)

    bad_label = shard("label-0000.tar", lambda i, s: {**s, "cls": b"99"} if i == 2 else s)
    with pytest.warns(UserWarning, match=f"skipping sample {samples[2]['__key__']} of {tmp_path}/label-0000.tar"):
        batches = list(loader(bad_label, batch_size=len(samples)).batches(1))
    # the batch stays full (Mixup needs its size): the dropped sample is made up from the next read
    assert batches[0]["skipped"] >= 1 and len(batches[0]["labels"]) == len(batches[0]["keys"]) == len(samples)
    assert samples[2]["__key__"] not in batches[0]["keys"]
    every_label_bad = shard("allbad-0000.tar", lambda i, s: {**s, "cls": b"99"})
    with pytest.warns(UserWarning), pytest.raises(shardformat.DataError, match="without one usable sample"):
        next(loader(every_label_bad, batch_size=4).batches(1))  # an error, never an endless wait

    corrupt = shard("jpeg-0000.tar", lambda i, s: {**s, "jpg": b"garbage"} if i == 1 else s)
    with pytest.raises(shardformat.DataError) as e:
        list(loader(corrupt, batch_size=len(samples)).batches(1))
    message = str(e.value)
    assert str(tmp_path) in message and "--verify" in message and "default loader" in message


def test_a_truncated_shard_is_refused_at_start_naming_it(demo_shards, tmp_path):
    """DALI reads every tar's members when the pipeline is built: a cut shard stops the run before any
    step, and the error names the shard (DALI's own message does not)."""
    src = shardformat.load_split(demo_shards, "train")
    whole, cut = tmp_path / "whole-0000.tar", tmp_path / "cut-0001.tar"
    whole.write_bytes(Path(src.urls[0]).read_bytes())
    cut.write_bytes(Path(src.urls[1]).read_bytes()[:30_000])
    assert dali_loader.broken_tar(str(whole)) is None and dali_loader.broken_tar(str(cut))
    shards = shardformat.ShardSet("train", [str(whole), str(cut)], src.lengths[:2], 10)
    with pytest.raises(shardformat.DataError, match=f"{cut}: truncated"):
        loader(shards)


