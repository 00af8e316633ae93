"""Shard readers: the training stream and the exactly-once validation stream.

Both yield batches as dicts {"images", "labels", "keys", "skipped"}; "skipped" counts samples the producing
worker dropped since its previous batch (corrupt image, bad label, foreign tar member, samples lost to a
truncated shard), so the count survives DataLoader worker processes.

Shards are local files only. Their names come from `_info.json` (or a brace pattern typed by the user) and
are opened here with `open()`: no string from a data file ever reaches webdataset's URL opener, whose
`pipe:` URLs run shell commands.
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
import warnings
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from vitbench.errors import UserError
from vitbench.prep import INFO_FILE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_PCT = 224 / 256  # resize 256, center-crop 224; scales with --img-size


# A sample member is `<key>.<ext>` with no directory part; anything else in a tar is foreign.
_MEMBER = re.compile(r"^([^./\\]+)\.([^/\\]+)$")


def split_member(name: str) -> tuple[str, str] | None:
    """A tar member name -> (sample key, extension): the key ends at the first dot, as webdataset and timm
    read it. None for a name that is no sample file (a directory part, no extension, a leading dot). The one
    rule every reader and writer of shards here uses."""
    match = _MEMBER.match(name)
    return (match[1], match[2]) if match else None
TAR_BLOCK = 512
# Consecutive train shards that yield nothing before the run stops instead of resampling forever.
MAX_CONSECUTIVE_BAD_SHARDS = 20
# Consecutive samples that are all dropped (bad label, undecodable image) before the run stops: far more than
# any real split's bad run, far fewer than a spin over shards that hold no usable sample at all.
MAX_CONSECUTIVE_BAD_SAMPLES = 2000


class DataError(UserError):
    pass


def error_message(e: BaseException) -> str:
    """The one-line message of a DataError, also when a DataLoader worker re-raised it with its traceback."""
    text = str(e).strip()
    marker = f"{DataError.__name__}: "
    return text.rsplit(marker, 1)[-1] if marker in text else text.splitlines()[-1] if text else repr(e)


def check_shard_name(name, info_path: Path) -> None:
    """A shard listed in `_info.json` must be a plain relative file name under the data directory."""
    if not isinstance(name, str) or not name:
        raise DataError(f"{info_path}: shard name {name!r} is not a file name")
    parts = Path(name).parts
    if (Path(name).is_absolute() or name.startswith("~") or "\\" in name or ".." in parts
            or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", name)):
        raise DataError(f"{info_path}: shard name {name!r} is not a plain relative file name under the data "
                        "directory (no URL scheme, absolute path or '..'); fix the file or re-make the shards")


def _check_tar_header(path: Path) -> str | None:
    """Why PATH is not a tar, from its first header block alone (cheap enough for 1,024 shards)."""
    try:
        with open(path, "rb") as f:
            block = f.read(TAR_BLOCK)
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
        return None
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    except tarfile.HeaderError as e:
        return f"not a tar file ({e})" if block else "empty file"


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
        names = list(entry["filenames"])
        lengths = list(entry["shard_lengths"])
        num_classes = int(info.get("num_classes") or len(info.get("classes", [])) or 1000)
    except (ValueError, KeyError, TypeError, OverflowError) as e:
        raise DataError(f"{info_path}: no usable '{split}' split ({type(e).__name__}: {e})") from None
    if len(names) != len(lengths) or num_classes < 1:
        raise DataError(f"{info_path}: split '{split}' lists {len(names)} shards but {len(lengths)} shard_lengths")
    bad = [n for n in lengths if isinstance(n, bool) or not isinstance(n, int) or n < 0]
    if bad:  # JSON lets a file say Infinity, NaN, -3 or 2.5 samples
        raise DataError(f"{info_path}: split '{split}' has shard length {bad[0]!r}; lengths are integers >= 0")
    twice = sorted({n for n in names if names.count(n) > 1}, key=str)
    if twice:  # a shard read twice a pass would be evaluated twice
        raise DataError(f"{info_path}: split '{split}' lists shard {twice[0]!r} more than once")
    for name in names:
        check_shard_name(name, info_path)
    urls = [str(data_dir / f) for f in names]
    missing = [u for u in urls if not Path(u).is_file()]  # is_file follows a user's symlink to another disk
    if missing or not urls:
        raise DataError(f"{info_path}: split '{split}' lists shards that are not there: "
                        f"{', '.join(missing[:3]) or '(none listed)'}")
    broken = [(u, why) for u in urls if (why := _check_tar_header(Path(u)))]
    if broken:
        raise DataError(f"{info_path}: split '{split}' has {len(broken)} unreadable shard(s): "
                        + "; ".join(f"{u}: {why}" for u, why in broken[:3])
                        + "; re-make them with shards/prep_shards.py (--verify lists every problem)")
    return ShardSet(split, urls, lengths, num_classes)


# Workers hand uint8 CHW images to the trainer (timm's `use_prefetcher` transforms: no float conversion or
# normalization in the worker, a quarter of the bytes through shared memory); OnDevice normalizes them.
def train_transform(img_size: int, auto_augment: str | None):
    from timm.data import create_transform

    return create_transform(img_size, is_training=True, auto_augment=auto_augment, interpolation="bilinear",
                            re_prob=0.0, mean=IMAGENET_MEAN, std=IMAGENET_STD, use_prefetcher=True)


def eval_transform(img_size: int):
    from timm.data import create_transform

    return create_transform(img_size, is_training=False, crop_pct=EVAL_CROP_PCT, interpolation="bilinear",
                            mean=IMAGENET_MEAN, std=IMAGENET_STD, use_prefetcher=True)


class OnDevice:
    """A batch from the workers (uint8 NCHW images, int labels) -> the model's input on the device: copied
    (from pinned memory, non-blocking), converted to float and normalized there as timm's GPU prefetcher
    does, mixed (mixup/cutmix, training only), then cast to the precision's input dtype."""

    def __init__(self, device, dtype, mixup=None):
        self.device, self.dtype, self.mixup = device, dtype, mixup
        self.mean = torch.tensor([255 * m for m in IMAGENET_MEAN], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([255 * s for s in IMAGENET_STD], device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        x = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        y = labels.to(self.device, non_blocking=True)
        if self.mixup:
            x, y = self.mixup(x, y)
        return x.to(self.dtype), y


class _SkipLog:
    """Per-worker count of dropped samples, with one warning naming shard and key for each."""

    def __init__(self):
        self.count = 0

    def drop(self, where: str, why: str, count: int = 1) -> None:
        self.count += count
        warnings.warn(f"skipping {where}: {why}", stacklevel=2)

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


def tar_samples(path: str, log: _SkipLog, count_read_errors: bool = True):
    """Samples ({"__key__", "__url__", ext: bytes}) of one local tar shard, opened as a plain file.

    Only regular members named `<key>.<ext>` count; a member with a directory part, `..`, an absolute name,
    a link or a device file is skipped and counted once per foreign name. A truncated or corrupt tar ends
    the shard with one warning (counted unless the caller counts lost samples itself)."""
    sample, last_foreign = None, None
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
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


def parse_label(raw: bytes, num_classes: int) -> int:
    """A sample's `.cls` bytes -> its class index; ValueError for anything else (both loaders drop those)."""
    text = raw.decode("ascii").strip()
    if not text.isdigit() or int(text) >= num_classes:
        raise ValueError(f"label {text[:20]!r} is not a class index in [0, {num_classes})")
    return int(text)


def _transformed(samples, transform, repeats: int, log: _SkipLog, num_classes: int):
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
                                "`shards/prep_shards.py --verify` or re-make it") from None
            continue
        bad_in_a_row = 0
        for _ in range(repeats):
            yield transform(img), label, sample["__key__"]


def _train_shard_samples(shards, log: _SkipLog):
    """Samples of the train shard stream; a run of shards that all yield nothing is an error, not an
    endless retry."""
    failed = []
    for shard in shards:
        got = False
        # a pass's first and last shard may be read in part: samples before "first" are read past, not decoded
        for sample in islice(tar_samples(shard["url"], log), shard.get("first", 0), shard.get("end")):
            got = True
            yield sample
        if got:
            failed.clear()
            continue
        failed.append(shard["url"])
        if len(failed) >= MAX_CONSECUTIVE_BAD_SHARDS:
            names = sorted({Path(u).name for u in failed})
            dirs = sorted({str(Path(u).parent) for u in failed})
            raise DataError(f"no sample could be read from {len(failed)} train shards in a row under "
                            f"{', '.join(dirs)} ({', '.join(names)}); the train split looks unreadable: check it "
                            "with `shards/prep_shards.py --verify` or re-make it")


PERMUTED, RESAMPLED = "permuted", "resampled"


def epoch_sampling(num_shards: int, world_size: int, workers: int, repeats: int) -> str:
    """PERMUTED when every rank x worker gets at least one shard of each epoch, RESAMPLED otherwise."""
    return PERMUTED if num_shards >= world_size * max(1, workers) * repeats else RESAMPLED


def _pass_share(urls: list[str], lengths: list[int] | None, rank: int, world_size: int, worker: int, workers: int,
                seed: int, pass_index: int) -> list[dict]:
    """One consumer's (rank x worker) part of a pass: shards {"url", "first", "end"} in the order of a seeded
    permutation of the split, the same on every rank. With the shards' lengths (`_info.json`) each consumer
    gets an equal run of samples of the permuted split, so no consumer has a shard more than another (whole
    shards dealt out would leave up to a shard per consumer unread each pass, while others top up at random);
    at most the first and last shard of a run are read in part. Without lengths (a brace pattern), whole
    shards are dealt out in turn."""
    import random

    order = random.Random(wds.utils.make_seed(seed, pass_index)).sample(range(len(urls)), len(urls))
    consumers, me = world_size * workers, rank * workers + worker
    if lengths is None:
        return [{"url": urls[i]} for i in order[me::consumers]]
    lo, hi = _range_split(0, sum(lengths), consumers, me)
    share, pos = [], 0
    for i in order:
        if pos + lengths[i] > lo and pos < hi:
            share.append({"url": urls[i], "first": max(lo - pos, 0), "end": min(hi - pos, lengths[i])})
        pos += lengths[i]
        if pos >= hi:
            break
    return share


def _pass_samples(urls: list[str], lengths: list[int] | None, rank: int, world_size: int, worker: int, workers: int,
                  seed: int, epoch: int, repeats: int, shuffle, log: _SkipLog):
    """This rank and worker's samples from EPOCH to the end of its pass, every shard of the pass once.

    With repeated augmentation x R a pass spans R epochs (R-fold repeated samples, as timm's
    RepeatAugSampler shows each image R times over ranks), and the consumer's share is read as one stream
    across them: an epoch takes the next batches of it, so whole shards are never cut at an epoch boundary
    and a pass reads nearly all of its images (`pass_coverage`). A launch that resumes inside a pass starts
    at the share's R-th part of that epoch. A consumer that runs dry before its rank's step count then
    resamples shards of the whole split (seeded, shuffled apart from the share), so no rank ever waits on
    another in a collective and the top-up never displaces the pass's own samples."""
    pass_index, part = divmod(epoch, repeats)
    share = _pass_share(urls, lengths, rank, world_size, worker, workers, seed, pass_index)
    yield from shuffle(_train_shard_samples(share[len(share) * part // repeats:], log))
    yield from _resampled_samples(urls, wds.utils.make_seed(seed, epoch, rank, worker), shuffle, log)


def _worker_batches(start: int, count: int, worker: int, workers: int) -> int:
    """How many of the rank's batches [start, start + count) worker WORKER of WORKERS makes: a DataLoader asks
    its workers in turn, so worker w makes the rank's batches w, w + W, w + 2W, ..."""
    return len(range(start + (worker - start) % workers, start + count, workers))


def pass_coverage(shard_lengths: list[int], world_size: int, workers: int, repeats: int, batch_size: int,
                  batches_per_epoch: int) -> float:
    """The fraction of the split's images one pass (REPEATS epochs of BATCHES_PER_EPOCH batches per rank) reads,
    from the layout alone: the same shares and worker batch counts the loader uses, no image read. The rest of
    each consumer's demand is resampled top-up (a share longer than its demand leaves its last images unread)."""
    workers = max(1, workers)
    urls = [str(i) for i in range(len(shard_lengths))]
    read = 0.0
    for rank in range(world_size):
        for worker in range(workers):
            share = _pass_share(urls, shard_lengths, rank, world_size, worker, workers, 0, 0)
            demand = sum(_worker_batches(e * batches_per_epoch, batches_per_epoch, worker, workers)
                         for e in range(repeats)) * batch_size / repeats  # decoded images: R copies of each
            read += min(sum(seg["end"] - seg["first"] for seg in share), demand)
    return read / sum(shard_lengths)


def _resampled_samples(urls: list[str], seed: int, shuffle, log: _SkipLog):
    """Shards drawn with replacement from the whole split, forever (seeded): a bad share alone cannot
    look like a bad split."""
    import random

    rng = random.Random(seed)
    yield from shuffle(_train_shard_samples(({"url": rng.choice(urls)} for _ in iter(int, 1)), log))


def _batched(pairs, batch_size: int, log: _SkipLog, partial_last: bool):
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


def _worker_init(_worker_id: int) -> None:
    from vitbench.lifecycle import ignore_stop_signals

    ignore_stop_signals()


def _seed_augmentation(seed: int) -> None:
    """Augmentation RNGs differ per rank, worker and epoch (torch would give every rank the same). Only
    inside worker processes: a loader without workers leaves the trainer's own RNGs alone."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _TrainBatches(IterableDataset):
    """One rank's train batches, epoch after epoch, made inside each loader worker.

    A DataLoader over an iterable dataset asks its W workers for batches in turn (worker w makes the rank's
    batches w, w + W, w + 2W, ...) and hands them on in that order. So each worker can work out which epoch
    its next batch belongs to and start that epoch's samples exactly where the rank's stream does: one set
    of workers serves the whole launch, with no process restart between epochs (a restart per epoch cost
    ~2.5 s with 12 workers on a GPU machine, measured 2026-11-28). With permuted epochs one stream (and one
    shuffle buffer) serves a whole pass; resampled epochs start a stream and a shuffle buffer each, which a
    worker fills while the batches it prefetched still feed the trainer."""

    def __init__(self, urls: list[str], lengths: list[int] | None, transform, batch_size: int, *, rank: int,
                 world_size: int, workers: int, seed: int, epoch: int, repeats: int, resume_step: int,
                 first_batches: int, batches_per_epoch: int | None, shuffle_buffer: int, num_classes: int):
        self.urls, self.lengths, self.transform, self.batch_size = urls, lengths, transform, batch_size
        self.rank, self.world_size, self.seed, self.repeats = rank, world_size, seed, repeats
        self.first_epoch, self.resume_step = epoch, resume_step
        self.first_batches, self.batches_per_epoch = first_batches, batches_per_epoch
        self.shuffle_buffer, self.num_classes = shuffle_buffer, num_classes
        self.sampling = epoch_sampling(len(urls), world_size, workers, repeats)

    def _stream(self, epoch: int, worker: int, workers: int, log: _SkipLog):
        """Batches from EPOCH on (to the end of its pass when permuted). A launch resumed inside an epoch starts
        that epoch's shards again with other augmentation seeds."""
        resume = self.resume_step if epoch == self.first_epoch else 0
        stream_seed = wds.utils.make_seed(self.seed, epoch, self.world_size, resume)
        rank_seed = wds.utils.make_seed(stream_seed, self.rank)
        if get_worker_info() is not None:
            _seed_augmentation(wds.utils.make_seed(rank_seed, worker))
        shuffle = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 500), seed=rank_seed)
        if self.sampling == PERMUTED:
            samples = _pass_samples(self.urls, self.lengths, self.rank, self.world_size, worker, workers, self.seed,
                                    epoch, self.repeats, shuffle, log)
        else:
            samples = _resampled_samples(self.urls, wds.utils.make_seed(stream_seed, self.rank, worker), shuffle,
                                         log)
        pairs = _transformed(samples, self.transform, self.repeats, log, self.num_classes)
        return _batched(pairs, self.batch_size, log, partial_last=False)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        log = _SkipLog()
        epoch, start, count = self.first_epoch, 0, self.first_batches
        stream, stream_pass = None, None
        while True:
            n = _worker_batches(start, count, worker, workers)  # this worker's batches of the epoch
            if n:
                # permuted: one stream per pass, read on across its epochs; resampled: one per epoch
                if self.sampling != PERMUTED or stream_pass != epoch // self.repeats:
                    stream, stream_pass = self._stream(epoch, worker, workers, log), epoch // self.repeats
                yield from islice(stream, n)
            if self.batches_per_epoch is None:
                return
            epoch, start, count = epoch + 1, start + count, self.batches_per_epoch


def train_loader(shards: ShardSet | str, transform, batch_size: int, steps: int, *, rank: int, world_size: int,
                 workers: int, seed: int, epoch: int, repeats: int = 1, resume_step: int = 0,
                 steps_per_epoch: int | None = None, shuffle_buffer: int = 2000, pin_memory: bool = False,
                 num_classes: int | None = None):
    """This rank's `steps` batches of epoch EPOCH (the rest of it when the launch resumes inside it,
    `resume_step` > 0). With `steps_per_epoch`, the stream then goes on with epochs EPOCH + 1, EPOCH + 2, ...
    of that many batches each, from the same worker processes (_TrainBatches). `shards` is a split from
    `_info.json` or a brace pattern such as "/data/imagenet1k-train-{0000..1023}.tar".

    With at least ranks x workers x repeats shards (`epoch_sampling` PERMUTED) an epoch reads every
    shard of its part of a seeded permutation once (_pass_samples); with fewer, each rank and worker
    resamples shards with replacement (RESAMPLED), so none ever runs dry."""
    if num_classes is None:
        num_classes = shards.num_classes if isinstance(shards, ShardSet) else 1000
    urls = wds.shardlists.expand_urls(shards) if isinstance(shards, str) else list(shards.urls)
    lengths = None if isinstance(shards, str) else list(shards.lengths)
    batches = _TrainBatches(urls, lengths, transform, batch_size, rank=rank, world_size=world_size, workers=workers,
                            seed=seed, epoch=epoch, repeats=repeats, resume_step=resume_step, first_batches=steps,
                            batches_per_epoch=steps_per_epoch, shuffle_buffer=shuffle_buffer,
                            num_classes=num_classes)
    return torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                       worker_init_fn=_worker_init, prefetch_factor=2 if workers else None)


class WdsTrainLoader:
    """A TrainLoader (vitbench.loaders) over one DataLoader for the whole launch: its workers carry on from
    one epoch into the next (_TrainBatches), and start when the first batch is asked for."""

    def __init__(self, loader: torch.utils.data.DataLoader, epoch_sampling: str):
        self._loader, self.epoch_sampling, self._batches = loader, epoch_sampling, None

    def batches(self, n: int):
        if self._batches is None:
            self._batches = iter(self._loader)
        for _ in range(n):
            yield next(self._batches)  # full batches only: _batched never yields a short train batch

    def close(self) -> None:
        """Stop the workers. They ignore SIGTERM (lifecycle.ignore_stop_signals), so the terminate() that
        multiprocessing sends them at exit would leave the process waiting on them; the iterator's own
        shutdown (what it runs when exhausted; a train stream never is) stops them in order."""
        batches, self._batches = self._batches, None
        shutdown = getattr(batches, "_shutdown_workers", None)  # none without workers (--workers 0)
        if shutdown:
            shutdown()


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
        """Samples at positions [lo, hi) of the split; positions come from `shard_lengths`, so a shard that
        is short (truncated) or long never shifts another shard's samples, and every position of the
        range that could not be read is counted as skipped."""
        start = 0
        for url, length in zip(self.shards.urls, self.shards.lengths):
            end = start + length
            if end > lo and start < hi:
                pos, stop = start, min(end, hi)
                for sample in tar_samples(url, log, count_read_errors=False):
                    if pos >= stop:
                        break
                    if pos >= lo:
                        yield sample
                    pos += 1
                lost = stop - max(pos, lo)
                if lost > 0:
                    log.drop(f"{lost} sample(s) of {url}", f"the shard holds fewer samples than the "
                             f"{length} that _info.json records", count=lost)
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
        pairs = _transformed(self._samples(lo, hi, log), self.transform, 1, log, self.shards.num_classes)
        yield from _batched(pairs, self.batch_size, log, partial_last=True)


def validation_loader(stream: ValidationStream, pin_memory: bool = False):
    workers = stream.workers if stream.workers > 1 else 0
    return wds.WebLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                         worker_init_fn=_worker_init if workers else None)
