"""`--loader`: what a train loader is to the trainer (TrainLoader), what a flag set asks of it (LoaderSpec),
and the one place that knows the two implementations, for building them and for what the Plan asks of them
(how an epoch is sampled, what share of the split a pass reads, what to warn about):

  wds   vitbench.data.wds_loader: our shard reader + PIL/timm transforms in DataLoader worker processes
  dali  vitbench.data.dali_loader: NVIDIA DALI (nvjpeg + GPU augmentation; CPU operators on a CPU)

Both hand the trainer full uint8 NCHW micro-batches as dicts {"images", "labels", "keys", "skipped"}; the
trainer never asks which one it has.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Iterator, Protocol

from vitbench.data import dali_loader, wds_loader
from vitbench.data.shardformat import DataError, ShardSet
from vitbench.data.shardread import Readers, StreamStart
from vitbench.data.transforms import AugmentPolicy, train_transform

LOADERS = ("wds", "dali")


class TrainLoader(Protocol):
    epoch_sampling: str  # results.json: how an epoch's samples were drawn (permuted, resampled, dali-sharded)

    def batches(self, micro_batches: int) -> Iterator[dict]:
        """The next MICRO_BATCHES micro-batches of this rank's stream, each exactly the micro-batch size."""

    def close(self) -> None:
        """Stop worker processes or threads; the loader is not used again."""


@dataclass(frozen=True)
class LoaderSpec:
    kind: str  # one of LOADERS
    workers: int  # DataLoader processes (wds) or DALI threads per rank
    batch_size: int
    repeats: int  # repeated augmentation: copies of each decoded image
    auto_augment: str  # --aa (transforms.AugmentPolicy)
    img_size: int

    def check(self) -> None:
        """What can be wrong with the loader before any work: the policy, DALI installed, the policy one DALI has."""
        AugmentPolicy.parse(self.auto_augment)
        if self.kind == "dali":
            if importlib.util.find_spec("nvidia.dali") is None:
                raise DataError("--loader dali needs NVIDIA DALI (pip install nvidia-dali-cuda130; `make setup` "
                                "installs it)")
            dali_loader.rand_augment_args(self.auto_augment)

    def epoch_sampling(self, shards: ShardSet, world_size: int) -> str:
        if self.kind == "dali":
            return dali_loader.EPOCH_SAMPLING
        return wds_loader.epoch_sampling(len(shards.urls), world_size, self.workers, self.repeats)

    def pass_coverage(self, shards: ShardSet, world_size: int, batches_per_epoch: int) -> float | None:
        """The share of the split a pass of permuted epochs reads (None where epochs are not permuted passes)."""
        if self.epoch_sampling(shards, world_size) != wds_loader.PERMUTED:
            return None
        return wds_loader.pass_coverage(shards.lengths, world_size, self.workers, self.repeats, self.batch_size,
                                        batches_per_epoch)

    def start_warnings(self, shards: ShardSet, world_size: int) -> list[str]:
        if self.kind == "dali" and world_size > 1 and dali_loader.index_paths(shards) is None:
            return [f"--loader dali without index files: each of the {world_size} ranks reads every train shard's "
                    "headers at start; write them once with `prep_shards.py --split train --dali-index`"]
        return []

    def to_json(self) -> dict:
        return asdict(self)


def build(spec: LoaderSpec, shards: ShardSet, *, readers: Readers, start: StreamStart, seed: int,
          optimizer_steps_per_epoch: int, grad_accum: int, device, pin_memory: bool = False) -> TrainLoader:
    """This rank's train loader for the rest of the launch, from START; an epoch is OPTIMIZER_STEPS_PER_EPOCH steps
    of GRAD_ACCUM micro-batches. PIN_MEMORY: the device copies from page-locked memory (the device layer's
    pins_memory)."""
    if spec.kind == "dali":  # the pipeline is built here, once per launch (it opens every train shard)
        return dali_loader.DaliTrainLoader(shards, spec.img_size, spec.auto_augment, batch_size=spec.batch_size,
                                           readers=readers, seed=seed + 1000 * start.optimizer_steps,
                                           repeats=spec.repeats, device=device)
    micro_batches_left = (optimizer_steps_per_epoch - start.optimizer_steps_in_epoch) * grad_accum
    return wds_loader.WdsTrainLoader(wds_loader.train_loader(
        shards, train_transform(spec.img_size, spec.auto_augment), batch_size=spec.batch_size,
        micro_batches=micro_batches_left, readers=readers, seed=seed, start=start, repeats=spec.repeats,
        micro_batches_per_epoch=optimizer_steps_per_epoch * grad_accum, pin_memory=pin_memory),
        spec.epoch_sampling(shards, readers.world_size))
