"""Reading samples out of tar shards, shared by the train loader and validation: a shard's samples as
{"__key__", "__url__", ext: bytes}, decoded and augmented pairs, batches that carry the count of samples
dropped on the way ("skipped"), so the count survives DataLoader worker processes.

A shard is opened by vitbench.data.remote.open_file (a local file, or one streaming request with bounded, resumable
retries): no string from a data file ever reaches webdataset's URL opener, whose `pipe:` URLs run shell
commands, nor any subprocess.
"""

from __future__ import annotations

import io
import tarfile
import warnings
from dataclasses import dataclass

import torch
from torch.utils.data import default_collate

from vitbench.data.remote import open_file
from vitbench.data.shardformat import DataError, parse_label, split_member
from vitbench.lifecycle import ignore_stop_signals


@dataclass(frozen=True)
class Readers:
    """Who reads a split: this RANK of WORLD_SIZE, each with WORKERS loader processes (wds) or threads (DALI)."""
    rank: int
    world_size: int
    workers: int


@dataclass(frozen=True)
class StreamStart:
    """Where a launch's train stream starts: EPOCH, after OPTIMIZER_STEPS_IN_EPOCH of its optimizer steps (a
    resume inside it), after OPTIMIZER_STEPS in all. Counts of micro-batches are named so where they are used."""
    epoch: int = 0
    optimizer_steps_in_epoch: int = 0
    optimizer_steps: int = 0


# Consecutive samples that are all dropped (bad label, undecodable image) before the run stops: far more than
# any real split's bad run, far fewer than a spin over shards that hold no usable sample at all.
MAX_CONSECUTIVE_BAD_SAMPLES = 2000


class SkipLog:
    """Per-worker count of dropped samples, with one warning naming shard and key for each."""

    def __init__(self):
        self.count = 0

    def drop(self, where: str, why: str, count: int = 1) -> None:
        self.count += count
        warnings.warn(f"skipping {where}: {why}", stacklevel=2)

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


def tar_samples(path: str, log: SkipLog, count_read_errors: bool = True):
    """Samples ({"__key__", "__url__", ext: bytes}) of one tar shard, local or remote, read as one stream.

    Only regular members named `<key>.<ext>` count; a member with a directory part, `..`, an absolute name,
    a link or a device file is skipped and counted once per foreign name. A truncated or corrupt tar ends
    the shard with one warning (counted unless the caller counts lost samples itself); so does a remote read
    that failed after its retries."""
    sample, last_foreign = None, None
    try:
        with open_file(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                parts = split_member(member.name)
                if not (parts and member.isreg()):
                    name = member.name.rsplit(".", 1)[0]
                    if name != last_foreign:
                        last_foreign = name
                        log.drop(f"{path} member {member.name!r}", "not a sample file (<key>.<ext>, a regular "
                                 "file with no directory part)")
                    continue
                key, ext = parts
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__url__": path}
                sample[ext.lower()] = tar.extractfile(member).read()
                tar.members = []  # stream mode would otherwise keep every header of a 1,252-image shard
    except (OSError, EOFError, tarfile.TarError) as e:
        # The sample being read when the tar broke is incomplete: dropped with the rest of the shard.
        log.drop(f"the rest of shard {path}", f"{type(e).__name__}: {e}", count=int(count_read_errors))
        return
    if sample is not None:
        yield sample


def decoded(samples, transform, repeats: int, log: SkipLog, num_classes: int):
    """Decode once, emit `repeats` independently augmented copies (repeated augmentation). A sample with a
    bad label or image is dropped here, so no bad sample ever reaches the model or the metrics."""
    from PIL import Image

    bad_in_a_row = 0
    for sample in samples:
        try:
            if "cls" not in sample or "jpg" not in sample:
                members = sorted(set(sample) - {"__key__", "__url__"})
                raise ValueError(f"no .cls label or no .jpg image (members: {members})")
            label = parse_label(sample["cls"], num_classes)
            img = Image.open(io.BytesIO(sample["jpg"]))
            if img.mode == "RGB":  # most JPEGs: decode in place, without convert()'s full copy (~2% per image)
                img.load()
            else:
                img = img.convert("RGB")
        except Exception as e:
            why = f"{type(e).__name__}: {e}"
            log.drop(f"sample {sample['__key__']} of {sample['__url__']}", why)
            bad_in_a_row += 1
            if bad_in_a_row >= MAX_CONSECUTIVE_BAD_SAMPLES:  # readable tars, nothing usable: stop, never spin
                raise DataError(f"{bad_in_a_row} samples in a row could not be used, the last {sample['__key__']} "
                                f"of {sample['__url__']} ({why}); the split looks unusable: check it with "
                                "`prep_shards.py --verify` or re-make it") from None
            continue
        bad_in_a_row = 0
        for _ in range(repeats):
            yield transform(img), label, sample["__key__"]


def batched(pairs, batch_size: int, log: SkipLog, partial_last: bool):
    # default_collate stacks straight into shared memory inside a DataLoader worker, saving the copy
    # that sending a plain torch.stack result to the main process would make.
    def batch(images, labels, keys):
        return {"images": default_collate(images), "labels": torch.tensor(labels), "keys": keys,
                "skipped": log.take()}

    images, labels, keys = [], [], []
    for img, label, key in pairs:
        images.append(img)
        labels.append(label)
        keys.append(key)
        if len(images) == batch_size:
            yield batch(images, labels, keys)
            images, labels, keys = [], [], []
    if images and partial_last:
        yield batch(images, labels, keys)
    elif partial_last and log.count:  # drops after the last image: a batch of no images that carries their count
        yield {"images": None, "labels": None, "keys": [], "skipped": log.take()}


def worker_init(_worker_id: int) -> None:
    ignore_stop_signals()


def range_split(lo: int, hi: int, parts: int, index: int) -> tuple[int, int]:
    n = hi - lo
    return lo + n * index // parts, lo + n * (index + 1) // parts
