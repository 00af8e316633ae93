"""`--loader dali`: the training stream as an NVIDIA DALI pipeline over the same shards and `_info.json`.

On a GPU the JPEGs are decoded by nvjpeg (`device="mixed"`, the hardware decoder where there is one)
fused with the RandomResizedCrop region, then resized, flipped and RandAugment-ed on the GPU; on a CPU
the same graph runs with DALI's CPU operators (so CI runs it). Batches leave the pipeline as uint8 NCHW,
like the default loader's, and transforms.OnDevice normalizes them: the two loaders feed the model the same way.
Validation keeps the exactly-once reader of vitbench.data.validation.

Sharding: DALI splits the split's samples over ranks (`shard_id`/`num_shards`) and reads every sample of its
part once per DALI epoch: honest epochs. The shards are read in the same order every epoch
(`shuffle_after_epoch` cannot be combined with `random_shuffle`); samples are shuffled within a 4,096-sample
buffer, and each epoch a rank moves on to the next part of the split (`stick_to_shard` off).
Repeated augmentation xR decodes each read sample R times with independent crops and augmentations.
Tar index files (`<shard>.idx`, DALI's `wds2idx` format, written by `prep_shards.py --dali-index`) are
used when every shard has one; without them DALI infers the index by reading the tars at start.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch

from vitbench.data.shardformat import DataError, ShardSet, parse_label, split_member
from vitbench.data.shardread import Readers
from vitbench.data.transforms import TORCHVISION_BINS, AugmentPolicy
from vitbench.device import Device

INDEX_SUFFIX = ".idx"
EPOCH_SAMPLING = "dali-sharded"  # results.json: DALI's reader splits the samples over ranks, each once per epoch
MAX_EMPTY_RUNS = 20  # pipeline runs in a row without a usable sample before the run stops
# torchvision's RandAugment translates by up to 150/331 of the image side (DALI's default: 100/224) and fills
# with black (DALI's default: grey).
_TORCHVISION_TRANSLATE_REL, _TORCHVISION_FILL = 150 / 331, 0
_TIMM_MAX_MAGNITUDE = 10  # timm's magnitudes run 0..10; DALI's are bins, as torchvision's


def rand_augment_args(policy: str | None) -> tuple[int, int] | None:
    """`--aa` -> (ops per image, DALI magnitude bin of TORCHVISION_BINS); None for no policy.

    'ra' (FlagPerf's, the default) maps one to one: DALI's default suite is torchvision's 14 ops with the same
    ranges, given torchvision's translation range and fill (below). What still differs: DALI's solarize
    threshold runs from 256 down (torchvision's from 255). timm's `rand-mM` maps to bin round(M/10 x 30) of the
    same suite: timm's own op set (Invert, SolarizeAdd...) and its magnitude noise (`mstd`) are not DALI's."""
    parsed = AugmentPolicy.parse(policy)
    if parsed.kind == "none":
        return None
    if parsed.kind == "torchvision":
        return parsed.num_ops, parsed.magnitude
    if not parsed.text.startswith("rand"):
        raise DataError(f"--loader dali supports RandAugment policies ('ra', 'rand-m9-mstd0.5'), not '{policy}'")
    n, m = 2, 9  # timm's defaults
    for part in parsed.text.split("-")[1:]:
        key, value = re.match(r"([a-z]+)(.*)", part).groups()
        if key == "m":
            m = float(value)
        elif key == "n":
            n = int(value)
    return n, round(m / _TIMM_MAX_MAGNITUDE * (TORCHVISION_BINS - 1))


def write_index(tar_path: str | Path) -> Path:
    """DALI's tar index (what its `wds2idx` writes: "v1.2 N", then per sample `ext offset size name` for
    each of its files) beside the shard as `<shard>.idx`, from Python's tarfile (no `tar` subprocess).
    Written to a temporary name and renamed: a half-written index is never taken for a whole one."""
    import tarfile

    tar_path = Path(tar_path)
    samples, last = [], None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            parts = split_member(member.name)
            if not (member.isreg() and parts):
                continue
            key, ext = parts
            if key != last:
                samples.append([])
                last = key
            samples[-1].append(f"{ext} {member.offset_data} {member.size} {member.name}")
    out = tar_path.with_name(tar_path.name + INDEX_SUFFIX)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(f"v1.2 {len(samples)}\n" + "".join(" ".join(parts) + "\n" for parts in samples))
    tmp.replace(out)
    return out


def broken_tar(path: str) -> str | None:
    """Why PATH is not a whole tar, from its headers alone: each member's data must lie inside the file, and
    the end-of-archive blocks must follow the last member (tarfile itself stops quietly at a cut header)."""
    import tarfile

    try:
        size = Path(path).stat().st_size
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.offset_data + member.size > size:
                    return f"truncated inside member {member.name!r}"
            if tar.offset + 2 * tarfile.BLOCKSIZE > size:
                return f"truncated after byte {tar.offset} (no end-of-archive blocks)"
    except (OSError, tarfile.TarError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def index_paths(shards: ShardSet) -> list[str] | None:
    paths = [u + INDEX_SUFFIX for u in shards.urls]
    return paths if all(Path(p).is_file() for p in paths) else None


def _graph(shards: ShardSet, img_size: int, rand_augment: tuple[int, int] | None, repeats: int, rank: int,
           world_size: int, gpu: bool):
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import rand_augment as dali_rand_augment

    jpegs, labels = fn.readers.webdataset(
        paths=shards.urls, index_paths=index_paths(shards), ext=["jpg", "cls"], missing_component_behavior="skip",
        shard_id=rank, num_shards=world_size, random_shuffle=True, initial_fill=4096,
        shuffle_after_epoch=False, name="Reader")
    keys = fn.get_property(jpegs, key="source_info")
    outputs = []
    for _ in range(repeats):  # independent crop, flip and augmentation per copy
        img = fn.decoders.image_random_crop(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                            random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
        img = fn.resize(img, resize_x=img_size, resize_y=img_size, interp_type=types.INTERP_LINEAR, antialias=True)
        img = fn.flip(img, horizontal=fn.random.coin_flip())
        if rand_augment:
            img = dali_rand_augment.rand_augment(img, n=rand_augment[0], m=rand_augment[1],
                                                 num_magnitude_bins=TORCHVISION_BINS, shape=[img_size, img_size],
                                                 max_translate_rel=_TORCHVISION_TRANSLATE_REL,
                                                 fill_value=_TORCHVISION_FILL, interp_type=types.INTERP_LINEAR)
        outputs.append(fn.transpose(img, perm=[2, 0, 1]))  # HWC -> CHW, still uint8
    return (*outputs, labels, keys)


class DaliTrainLoader:
    """A TrainLoader (vitbench.data.loaders), built once per launch: `batches(n)` yields the default loader's batch
    dicts ({"images" uint8 NCHW, "labels", "keys", "skipped"}) for the next n micro-batches, each full."""

    epoch_sampling = EPOCH_SAMPLING

    def __init__(self, shards: ShardSet, img_size: int, auto_augment: str | None, *, batch_size: int,
                 readers: Readers, seed: int, repeats: int, device: torch.device):
        from nvidia.dali import pipeline_def

        # DALI's own RandAugment calls operators it has since renamed: one warning per op, not ours to fix.
        warnings.filterwarnings("ignore", message=r"WARNING: `nvidia\.dali\.fn\.experimental\.",
                                category=DeprecationWarning)
        self.shards, self.device, self.repeats, self.batch_size = shards, device, repeats, batch_size
        self.gpu = device.type == "cuda"
        pipe = pipeline_def(_graph, enable_conditionals=True)(
            shards, img_size, rand_augment_args(auto_augment), repeats, readers.rank, readers.world_size, self.gpu,
            batch_size=-(-batch_size // repeats), num_threads=max(1, readers.workers),  # R copies, cut to size
            device_id=device.index if self.gpu else None, seed=seed + 7919 * readers.rank, prefetch_queue_depth=2)
        try:
            pipe.build()
        except RuntimeError as e:  # DALI does not say which tar: find it (headers only, a failure path)
            broken = next(((url, why) for url in shards.urls if (why := broken_tar(url))), None)
            where = f"{broken[0]}: {broken[1]}" if broken else None
            raise DataError(self._message("cannot open the train shards", e, where)) from None
        self.pipe = pipe

    def _message(self, what: str, e: Exception, where: str | None = None) -> str:
        text = " ".join(str(e).split())
        detail = text.split("encountered:", 1)[-1].split("C++ context:", 1)[0].strip()[:300]  # DALI's own words
        where = where or f"a shard under {Path(self.shards.urls[0]).parent}"
        return (f"DALI {what}: {where} ({detail}); DALI cannot skip such samples: find them with "
                "`prep_shards.py --verify`, or train with the default loader (it skips and counts them)")

    def _to_torch(self, tensor_list) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
        stream = Device().current_stream(self.device) if self.gpu else None
        return feed_ndarray(dense, out, cuda_stream=stream)

    def batches(self, micro_batches: int):
        for _ in range(micro_batches):
            yield self._full_batch()

    def close(self) -> None:
        self.pipe = None  # DALI's threads stop with the pipeline

    def _full_batch(self) -> dict:
        """`batch_size` images: a sample dropped for a bad label is made up from the next pipeline run, so
        Mixup (which needs an even batch) and the step's sample count never see a short batch. A run of
        pipeline outputs with no usable sample at all is an error, not an endless wait."""
        parts, have, skipped, empty_runs = [], 0, 0, 0
        while have < self.batch_size:
            x, y, names, dropped = self._run_once()
            parts.append((x, y, names))
            have += len(y)
            skipped += dropped
            empty_runs = 0 if len(y) else empty_runs + 1
            if empty_runs >= MAX_EMPTY_RUNS:
                raise DataError(f"DALI read {MAX_EMPTY_RUNS} batches in a row under "
                                f"{Path(self.shards.urls[0]).parent} without one usable sample (every label "
                                "bad?): check the split with `prep_shards.py --verify`")
        n = self.batch_size  # batch not a multiple of R: the last images lose their last copies
        x = torch.cat([p[0] for p in parts])[:n]
        y = torch.cat([p[1] for p in parts])[:n]
        names = [k for p in parts for k in p[2]][:n]
        return {"images": x, "labels": y, "keys": names, "skipped": skipped}

    def _run_once(self):
        """One pipeline run: R augmented copies of each sample read, samples with a bad label dropped."""
        try:
            *images, labels, keys = self.pipe.run()
        except RuntimeError as e:
            raise DataError(self._message("could not read or decode a train sample", e)) from None
        ok, values, names = [], [], []
        for i in range(len(labels)):
            # source_info is "<tar>:<offset>:<member>"; the key is the member's, by the one rule of shardformat.py
            source = bytes(np.asarray(keys.at(i))).decode("utf-8", "replace")
            tar, _offset, member = source.rsplit(":", 2)
            names.append((split_member(member) or (member, ""))[0])
            try:
                values.append(parse_label(bytes(np.asarray(labels.at(i))), self.shards.num_classes))
                ok.append(True)
            except ValueError as e:  # dropped below and counted, with the default reader's warning
                warnings.warn(f"skipping sample {names[-1]} of {tar}: {e}", stacklevel=2)
                values.append(0)
                ok.append(False)
        x = torch.cat([self._to_torch(t) for t in images])  # copy r of every sample after copy r-1
        y = torch.tensor(values * self.repeats)
        keep = torch.tensor(ok * self.repeats)
        names = names * self.repeats
        if not keep.all():
            x, y = x[keep.to(x.device)], y[keep]
            names = [name for name, good in zip(names, keep.tolist()) if good]
        return x, y, names, ok.count(False)
