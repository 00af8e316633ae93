"""The WebDataset train loader (`--loader wds`): one rank's micro-batches, epoch after epoch, from DataLoader
worker processes that read shards (vitbench.data.shardread) and run timm's transforms.

Sampling: with at least ranks x workers x repeats shards an epoch reads its part of a seeded permutation of the
split (PERMUTED: every image of a pass about once); with fewer, every consumer resamples shards (RESAMPLED).
"""

from __future__ import annotations

import warnings
from itertools import islice
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from vitbench.data.shardformat import DataError, ShardSet
from vitbench.data.shardread import (
    Readers,
    SkipLog,
    StreamStart,
    batched,
    decoded,
    range_split,
    tar_samples,
    worker_init,
)

# Consecutive train shards that yield nothing before the run stops instead of resampling forever.
MAX_CONSECUTIVE_BAD_SHARDS = 20


def _train_shard_samples(shards, log: SkipLog):
    """Samples of the train shard stream; a run of shards that all yield nothing is an error, not an
    endless retry. A shard that ends before the samples `_info.json` promised is reported when it ends."""
    failed = []
    for shard in shards:
        got = 0
        # a pass's first and last shard may be read in part: samples before "first" are read past, not decoded
        first, end = shard.get("first", 0), shard.get("end")
        for sample in islice(tar_samples(shard["url"], log), first, end):
            got += 1
            yield sample
        if end is not None and 0 < got < end - first:
            warnings.warn(f"{shard['url']} ended after {first + got} samples; _info.json records at least {end} "
                          "(re-make _info.json with prep_shards.py)", stacklevel=2)
        if got:
            failed.clear()
            continue
        failed.append(shard["url"])
        if len(failed) >= MAX_CONSECUTIVE_BAD_SHARDS:
            names = sorted({Path(u).name for u in failed})
            dirs = sorted({str(Path(u).parent) for u in failed})
            raise DataError(f"no sample could be read from {len(failed)} train shards in a row under "
                            f"{', '.join(dirs)} ({', '.join(names)}); the train split looks unreadable: check it "
                            "with `prep_shards.py --verify` or re-make it")


PERMUTED, RESAMPLED = "permuted", "resampled"


def epoch_sampling(num_shards: int, world_size: int, workers: int, repeats: int) -> str:
    """PERMUTED when every rank x worker gets at least one shard of each epoch, RESAMPLED otherwise."""
    return PERMUTED if num_shards >= world_size * max(1, workers) * repeats else RESAMPLED


def _pass_share(urls: list[str], lengths: list[int], rank: int, world_size: int, worker: int, workers: int,
                seed: int, pass_index: int) -> list[dict]:
    """One consumer's (rank x worker) part of a pass: shards {"url", "first", "end"} in the order of a seeded
    permutation of the split, the same on every rank. From the shards' lengths (`_info.json`) each consumer
    gets an equal run of samples of the permuted split, so no consumer has a shard more than another (whole
    shards dealt out would leave up to a shard per consumer unread each pass, while others top up at random);
    at most the first and last shard of a run are read in part."""
    import random

    order = random.Random(wds.utils.make_seed(seed, pass_index)).sample(range(len(urls)), len(urls))
    consumers, me = world_size * workers, rank * workers + worker
    lo, hi = range_split(0, sum(lengths), consumers, me)
    share, pos = [], 0
    for i in order:
        if pos + lengths[i] > lo and pos < hi:
            share.append({"url": urls[i], "first": max(lo - pos, 0), "end": min(hi - pos, lengths[i])})
        pos += lengths[i]
        if pos >= hi:
            break
    return share


def _pass_samples(urls: list[str], lengths: list[int], rank: int, world_size: int, worker: int, workers: int,
                  seed: int, epoch: int, repeats: int, shuffle, log: SkipLog):
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


def _resampled_samples(urls: list[str], seed: int, shuffle, log: SkipLog):
    """Shards drawn with replacement from the whole split, forever (seeded): a bad share alone cannot
    look like a bad split."""
    import random

    rng = random.Random(seed)
    yield from shuffle(_train_shard_samples(({"url": rng.choice(urls)} for _ in iter(int, 1)), log))


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

    def __init__(self, urls: list[str], lengths: list[int], transform, batch_size: int, *, readers: Readers,
                 seed: int, start: StreamStart, repeats: int, first_batches: int, batches_per_epoch: int | None,
                 shuffle_buffer: int, num_classes: int):
        self.urls, self.lengths, self.transform, self.batch_size = urls, lengths, transform, batch_size
        self.rank, self.world_size, self.seed, self.repeats = readers.rank, readers.world_size, seed, repeats
        self.first_epoch, self.resume_steps = start.epoch, start.optimizer_steps_in_epoch
        self.first_batches, self.batches_per_epoch = first_batches, batches_per_epoch
        self.shuffle_buffer, self.num_classes = shuffle_buffer, num_classes
        self.sampling = epoch_sampling(len(urls), readers.world_size, readers.workers, repeats)

    def _stream(self, epoch: int, worker: int, workers: int, log: SkipLog):
        """Batches from EPOCH on (to the end of its pass when permuted). A launch resumed inside an epoch starts
        that epoch's shards again with other augmentation seeds."""
        resume = self.resume_steps if epoch == self.first_epoch else 0  # a seed: other augmentation
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
        pairs = decoded(samples, self.transform, self.repeats, log, self.num_classes)
        return batched(pairs, self.batch_size, log, partial_last=False)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        log = SkipLog()
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


def train_loader(shards: ShardSet, transform, *, batch_size: int, micro_batches: int, readers: Readers,
                 seed: int, start: StreamStart = StreamStart(), repeats: int = 1,
                 micro_batches_per_epoch: int | None = None, shuffle_buffer: int = 2000, pin_memory: bool = False):
    """This rank's first MICRO_BATCHES batches, from START (the rest of its epoch when the launch resumes inside
    it). With MICRO_BATCHES_PER_EPOCH, the stream then goes on with epochs START.epoch + 1, + 2, ... of that many
    batches each, from the same worker processes (_TrainBatches).

    With at least ranks x workers x repeats shards (`epoch_sampling` PERMUTED) an epoch reads every
    shard of its part of a seeded permutation once (_pass_samples); with fewer, each rank and worker
    resamples shards with replacement (RESAMPLED), so none ever runs dry."""
    batches = _TrainBatches(list(shards.urls), list(shards.lengths), transform, batch_size, readers=readers,
                            seed=seed, start=start, repeats=repeats, first_batches=micro_batches,
                            batches_per_epoch=micro_batches_per_epoch, shuffle_buffer=shuffle_buffer,
                            num_classes=shards.num_classes)
    return torch.utils.data.DataLoader(batches, batch_size=None, num_workers=readers.workers,
                                       pin_memory=pin_memory, worker_init_fn=worker_init,
                                       prefetch_factor=2 if readers.workers else None)


class WdsTrainLoader:
    """A TrainLoader (vitbench.data.loaders) over one DataLoader for the whole launch: its workers carry on from
    one epoch into the next (_TrainBatches), and start when the first batch is asked for."""

    def __init__(self, loader: torch.utils.data.DataLoader, epoch_sampling: str):
        self._loader, self.epoch_sampling, self._batches = loader, epoch_sampling, None

    def batches(self, micro_batches: int):
        if self._batches is None:
            self._batches = iter(self._loader)
        for _ in range(micro_batches):
            yield next(self._batches)  # full batches only: _batched never yields a short train batch

    def close(self) -> None:
        """Stop the workers. They ignore SIGTERM (lifecycle.ignore_stop_signals), so the terminate() that
        multiprocessing sends them at exit would leave the process waiting on them; the iterator's own
        shutdown (what it runs when exhausted; a train stream never is) stops them in order."""
        batches, self._batches = self._batches, None
        shutdown = getattr(batches, "_shutdown_workers", None)  # none without workers (--workers 0)
        if shutdown:
            shutdown()
