"""Shard readers: the training stream and the exactly-once validation stream.

Both yield batches as dicts {"images", "labels", "keys", "skipped"}; "skipped" counts corrupt samples the
producing worker dropped since its previous batch, so the count survives DataLoader worker processes.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from vitbench.prep import INFO_FILE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_PCT = 224 / 256  # resize 256, center-crop 224; scales with --img-size


class DataError(Exception):
    pass


@dataclass
class ShardSet:
    """One split as described by `_info.json` (timm's `wds/` layout)."""

    split: str
    urls: list[str]
    lengths: list[int]
    num_classes: int

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)


def load_split(data_dir: str | Path, split: str) -> ShardSet:
    data_dir = Path(data_dir)
    info_path = data_dir / INFO_FILE
    if not info_path.is_file():
        raise DataError(f"{info_path}: not found; make shards with `python shards/prep_shards.py` "
                        "or point --data-dir at a directory holding _info.json and its tar shards")
    try:
        info = json.loads(info_path.read_text())
        entry = info["splits"][split]
        urls = [str(data_dir / f) for f in entry["filenames"]]
        lengths = [int(n) for n in entry["shard_lengths"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{info_path}: no usable '{split}' split ({type(e).__name__}: {e})") from None
    missing = [u for u in urls if not Path(u).is_file()]
    if missing or not urls:
        raise DataError(f"{info_path}: split '{split}' lists shards that are not there: "
                        f"{', '.join(missing[:3]) or '(none listed)'}")
    num_classes = info.get("num_classes") or len(info.get("classes", [])) or 1000
    return ShardSet(split, urls, lengths, int(num_classes))


def train_transform(img_size: int, auto_augment: str | None):
    from timm.data import create_transform

    return create_transform(img_size, is_training=True, auto_augment=auto_augment, interpolation="bilinear",
                            re_prob=0.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def eval_transform(img_size: int):
    from timm.data import create_transform

    return create_transform(img_size, is_training=False, crop_pct=EVAL_CROP_PCT, interpolation="bilinear",
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


class _SkipLog:
    """Per-worker count of dropped samples; also the webdataset error handler."""

    def __init__(self):
        self.count = 0

    def drop(self, where: str, exn: BaseException) -> None:
        self.count += 1
        warnings.warn(f"skipping corrupt sample {where}: {type(exn).__name__}: {exn}", stacklevel=2)

    def handler(self, exn: BaseException) -> bool:
        self.drop("(tar read error)", exn)
        return True

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


def _decode(sample: dict):
    from PIL import Image

    img = Image.open(io.BytesIO(sample["jpg"]))
    return img.convert("RGB"), int(sample["cls"])


def _transformed(samples, transform, repeats: int, log: _SkipLog):
    """Decode once, emit `repeats` independently augmented copies (repeated augmentation)."""
    for sample in samples:
        try:
            img, label = _decode(sample)
        except Exception as e:
            log.drop(f"{sample.get('__url__')} key {sample.get('__key__')}", e)
            continue
        for _ in range(repeats):
            yield transform(img), label, sample["__key__"]


def _batched(pairs, batch_size: int, log: _SkipLog, partial_last: bool):
    # default_collate stacks straight into shared memory inside a DataLoader worker, saving the copy
    # that sending a plain torch.stack result to the main process would make.
    images, labels, keys = [], [], []
    for img, label, key in pairs:
        images.append(img)
        labels.append(label)
        keys.append(key)
        if len(images) == batch_size:
            yield {"images": default_collate(images), "labels": torch.tensor(labels), "keys": keys,
                   "skipped": log.take()}
            images, labels, keys = [], [], []
    if images and partial_last:
        yield {"images": default_collate(images), "labels": torch.tensor(labels), "keys": keys,
                   "skipped": log.take()}


def _rank_worker_seed(rank: int) -> int:
    info = get_worker_info()
    return rank * 1000 + (info.id if info else 0)


def _seed_worker(base_seed: int, worker_id: int) -> None:
    """Augmentation RNGs differ per rank, worker and epoch (torch would give every rank the same)."""
    import random

    import numpy as np

    seed = wds.utils.make_seed(base_seed, worker_id)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_loader(shards: ShardSet | str, transform, batch_size: int, steps: int, *, rank: int, world_size: int,
                 workers: int, seed: int, epoch: int, repeats: int = 1, shuffle_buffer: int = 2000,
                 pin_memory: bool = False):
    """An epoch of `steps` batches of this rank, read from shards resampled per rank and worker, so no
    rank or worker ever runs dry (and none waits on another in a collective). `shards` is a split from
    `_info.json` or a brace pattern such as "/data/imagenet1k-train-{0000..1023}.tar"."""
    log = _SkipLog()
    stream_seed = wds.utils.make_seed(seed, epoch, world_size)
    pipeline = wds.DataPipeline(
        wds.ResampledShards(shards if isinstance(shards, str) else shards.urls, seed=stream_seed,
                            worker_seed=partial(_rank_worker_seed, rank),
                            deterministic=True),
        wds.tarfile_to_samples(handler=log.handler),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 500), seed=wds.utils.make_seed(stream_seed, rank)),
        partial(_transformed, transform=transform, repeats=repeats, log=log),
        partial(_batched, batch_size=batch_size, log=log, partial_last=False),
    )
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                           worker_init_fn=partial(_seed_worker, wds.utils.make_seed(stream_seed, rank)),
                           persistent_workers=False, prefetch_factor=2 if workers else None)
    return loader.with_epoch(steps)


def _range_split(lo: int, hi: int, parts: int, index: int) -> tuple[int, int]:
    n = hi - lo
    return lo + n * index // parts, lo + n * (index + 1) // parts


class ValidationStream(IterableDataset):
    """Each rank takes a contiguous range of the split's samples and each DataLoader worker a
    contiguous part of that, so every sample is read exactly once: nothing is padded with
    duplicates and nothing is dropped, whatever the shard lengths, ranks and workers."""

    def __init__(self, shards: ShardSet, transform, batch_size: int, rank: int, world_size: int, workers: int):
        self.shards, self.transform, self.batch_size = shards, transform, batch_size
        self.rank, self.world_size, self.workers = rank, world_size, max(1, workers)

    def worker_range(self, rank: int, worker: int) -> tuple[int, int]:
        lo, hi = _range_split(0, self.shards.num_samples, self.world_size, rank)
        return _range_split(lo, hi, self.workers, worker)

    def batches_of_rank(self, rank: int) -> int:
        return sum(math.ceil((hi - lo) / self.batch_size)
                   for lo, hi in (self.worker_range(rank, w) for w in range(self.workers)))

    def max_batches_per_rank(self) -> int:
        """Forwards every rank must run so that all run the same number (ZeRO-3 gathers in forward)."""
        return max(self.batches_of_rank(r) for r in range(self.world_size))

    def _samples(self, lo: int, hi: int, log: _SkipLog):
        start = 0
        for url, length in zip(self.shards.urls, self.shards.lengths):
            end = start + length
            if end > lo and start < hi:
                pos = start
                for sample in wds.tariterators.tarfile_samples([{"url": url}], handler=log.handler):
                    if pos >= hi:
                        break
                    if pos >= lo:
                        yield sample
                    pos += 1
            start = end
            if start >= hi:
                break

    def __iter__(self):
        info = get_worker_info()
        lo, hi = self.worker_range(self.rank, info.id if info else 0)
        if info is None and self.workers > 1:  # read in this process: cover every worker's part
            lo, _ = self.worker_range(self.rank, 0)
            _, hi = self.worker_range(self.rank, self.workers - 1)
        log = _SkipLog()
        pairs = _transformed(self._samples(lo, hi, log), self.transform, 1, log)
        yield from _batched(pairs, self.batch_size, log, partial_last=True)


def validation_loader(stream: ValidationStream, pin_memory: bool = False):
    workers = stream.workers if stream.workers > 1 else 0
    return wds.WebLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory)
