"""Everything about the images: where shards live, what they hold, how they are read, made and augmented.

  shardformat   the on-disk format (`_info.json` + tar shards) and its checks; ShardSet, one split
  remote        local, https://, s3://, gs:// and hf:// directories: parsing, pinning, resumable reads
  shardread     tar samples -> decoded, labelled samples (skipping and counting corrupt ones)
  transforms    train augmentation (torchvision's RandAugment by default) and the eval transform
  loaders       the train loader the Plan picks (LoaderSpec) over the two readers below
  wds_loader    WebDataset on DataLoader workers (local or remote shards)
  dali_loader   NVIDIA DALI (local shards; decoding on the GPU, or on the CPU here)
  validation    the validation stream: every sample once across ranks
  prep          ImageFolder / ILSVRC2012 -> shards (prep_shards.py), and --verify
  demo          the embedded demo set (`python -m vitbench.data.demo`)

`open_data_dir` is the one entry the Plan calls: a --data-dir becomes its two splits, checked, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from vitbench.data.remote import Location, RetryPolicy, parse, pin
from vitbench.data.shardformat import DataError, ShardSet, load_split, read_info


@dataclass(frozen=True)
class DataDir:
    location: Location  # pinned: an hf:// revision is its commit
    train: ShardSet
    val: ShardSet

    @property
    def identity(self) -> dict:
        """What a checkpoint and results.json record of the data: a resume on other shards is refused."""
        return {"source": self.location.source, "revision": self.location.revision,
                "info_sha256": self.train.info_sha256}


def open_data_dir(text: str, *, loader_kind: str, environ: Mapping[str, str]) -> DataDir:
    """TEXT (a --data-dir) as its train and validation splits; every problem a start can find is one DataError.
    `_info.json` is read once here: every rank reads it, and a remote one is a request."""
    location = parse(text)
    RetryPolicy.from_env(environ)  # a bad VITBENCH_READ_* is refused now, not at the first shard
    if location.remote and loader_kind == "dali":
        raise DataError(f"--loader dali reads local shards only (DALI opens files by path), not {text}: "
                        "use --loader wds, which streams https/s3/gs/hf, or copy the shards to a local disk")
    location = pin(location)  # hf://: the revision's commit now, the same for every rank and resume
    info = read_info(location)
    return DataDir(location, load_split(location, "train", info), load_split(location, "validation", info))
