"""Validation: every sample of the split read exactly once across ranks and loader workers.
"""

from __future__ import annotations

import math
import warnings

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from vitbench.data.shardformat import ShardSet
from vitbench.data.shardread import SkipLog, batched, decoded, range_split, tar_samples, worker_init


class ValidationStream(IterableDataset):
    """Each rank takes a contiguous range of the split's samples and each DataLoader worker a
    contiguous part of that, so every sample is read exactly once: nothing is padded with
    duplicates and nothing is dropped, whatever the shard lengths, ranks and workers."""

    def __init__(self, shards: ShardSet, transform, batch_size: int, rank: int, world_size: int, workers: int):
        self.shards, self.transform, self.batch_size = shards, transform, batch_size
        self.rank, self.world_size, self.workers = rank, world_size, max(1, workers)

    def worker_range(self, rank: int, worker: int) -> tuple[int, int]:
        lo, hi = range_split(0, self.shards.num_samples, self.world_size, rank)
        return range_split(lo, hi, self.workers, worker)

    def batches_of_rank(self, rank: int) -> int:
        return sum(math.ceil((hi - lo) / self.batch_size)
                   for lo, hi in (self.worker_range(rank, w) for w in range(self.workers)))

    def max_batches_per_rank(self) -> int:
        """Forwards every rank must run so that all run the same number (ZeRO-3 gathers in forward)."""
        return max(self.batches_of_rank(r) for r in range(self.world_size))

    def _samples(self, lo: int, hi: int, log: SkipLog):
        """Samples at positions [lo, hi) of the split; positions come from `shard_lengths`, so a shard that
        is short (truncated) or long never shifts another shard's samples, and every position of the
        range that could not be read is counted as skipped. A shard found longer than recorded is reported as
        soon as its extra sample is seen (its extra samples are no part of the split: never evaluated)."""
        start = 0
        for url, length in zip(self.shards.urls, self.shards.lengths):
            end = start + length
            if end > lo and start < hi:
                pos, stop = start, min(end, hi)
                for sample in tar_samples(url, log, count_read_errors=False):
                    if pos >= stop:
                        if stop == end:
                            warnings.warn(f"{url} holds more samples than the {length} that _info.json records; "
                                          "the extra ones are not evaluated (re-make _info.json with "
                                          "prep_shards.py)", stacklevel=2)
                        break
                    if pos >= lo:
                        yield sample
                    pos += 1
                lost = stop - max(pos, lo)
                if lost > 0:
                    log.drop(f"{lost} sample(s) of {url}", f"the shard ended (unreadable, or shorter than the "
                             f"{length} samples that _info.json records)", count=lost)
            start = end
            if start >= hi:
                break

    def __iter__(self):
        info = get_worker_info()
        lo, hi = self.worker_range(self.rank, info.id if info else 0)
        if info is None and self.workers > 1:  # read in this process: cover every worker's part
            lo, _ = self.worker_range(self.rank, 0)
            _, hi = self.worker_range(self.rank, self.workers - 1)
        log = SkipLog()
        pairs = decoded(self._samples(lo, hi, log), self.transform, 1, log, self.shards.num_classes)
        yield from batched(pairs, self.batch_size, log, partial_last=True)


def validation_loader(stream: ValidationStream, pin_memory: bool = False):
    workers = stream.workers if stream.workers > 1 else 0
    return wds.WebLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                         worker_init_fn=worker_init if workers else None)
