#!/usr/bin/env python
"""Train-loader throughput, side by side on the same demo images (a larger draw: 300 per class), the same
training transform (RandomResizedCrop + flip + RandAugment m9), batch size and number of workers/threads:

  imagefolder_float   torchvision's ImageFolder, float32 normalized in the worker (the reference)
  ours_float          our shard reader with that float transform (what train_vit.py did before)
  ours_uint8          our shard reader as train_vit.py runs it: uint8 batches, normalized on the device
  ours_uint8_ra3      the same with repeated augmentation x3 (one decode, three samples)
  dali_cpu_ra/_no_ra  `--loader dali` on DALI's CPU operators, with and without RandAugment
  dali_gpu_ra         `--loader dali` on the GPU (nvjpeg), when there is one
  single_core_uint8   one core decoding + transforming (the per-worker limit; cores per 1,000 img/s)

Rounds alternate the loaders so machine noise hits all of them alike; medians are reported.

    python bench/loader.py [--img-size 224] [--workers 2] [--images 2048] [--rounds 3] [--no-dali] [--only ROWS]
    python bench/loader.py --workers 12 --batch-size 64 --per-class 400     # a GPU machine's 12 workers

The last line is JSON with the figures and ratios.
"""
import argparse
import io
import json
import statistics
import time
from pathlib import Path

import torch

from vitbench.data import demo, shardformat, transforms, wds_loader
from vitbench.data.shardread import Readers


def rate(loader, images: int, skip_batches: int) -> float:
    """Steady-state images/s: worker start-up and the batches the workers prefetched meanwhile (2 each) are
    not timed; with 12 workers, skipping only 4 timed the drain of that buffer (2026-11-28, 8-80k img/s)."""
    it = iter(loader)
    for _ in range(skip_batches):
        next(it)
    seen, t = 0, time.perf_counter()
    for batch in it:
        seen += len(batch["labels"] if isinstance(batch, dict) else batch[1])
        if seen >= images:
            break
    return seen / (time.perf_counter() - t)


def single_core_rate(files, transform, images: int) -> float:
    from PIL import Image

    blobs = [f.read_bytes() for f in files[:64]]
    t = time.perf_counter()
    for i in range(images):
        transform(Image.open(io.BytesIO(blobs[i % len(blobs)])).convert("RGB"))
    return images / (time.perf_counter() - t)


def dali_rate(train, args, auto_augment, device, images: int, skip_batches: int = 4) -> float:
    from vitbench.data.dali_loader import DaliTrainLoader

    loader = DaliTrainLoader(train, args.img_size, auto_augment, batch_size=args.batch_size,
                             readers=Readers(0, 1, args.workers), seed=0, repeats=1, device=device)
    batches = loader.batches(skip_batches + images // args.batch_size + 1)
    for _ in range(skip_batches):  # pipeline start-up and prefetch filling are not timed
        next(batches)
    seen, t = 0, time.perf_counter()
    for batch in batches:
        seen += len(batch["labels"])
        if seen >= images:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2, help="loader processes (DALI: threads)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=2048, help="images timed per loader and round")
    p.add_argument("--per-class", type=int, default=300, help="demo train images per class (10 classes)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-dali", action="store_true", help="leave the DALI loaders out")
    p.add_argument("--only", default=None, help="comma-separated rows to measure (imagefolder_float is always in: "
                                                 "the ratios are to it)")
    args = p.parse_args()
    torch.set_num_threads(1)

    shards_dir = demo.build(Path(__file__).resolve().parent / "out" / f"demo-{args.per_class}",
                            train_per_class=args.per_class, val_per_class=1, progress=False)
    skip = 2 * args.workers + 4  # DataLoader's prefetch (2 batches per worker) and a few more
    if args.per_class * len(demo.PHOTOS) < args.images + (skip + 1) * args.batch_size:
        p.error("--per-class too small: ImageFolder's epoch must outlast the skipped and the timed batches")
    train = shardformat.load_split(shards_dir, "train")
    uint8_tf = transforms.train_transform(args.img_size, transforms.FLAGPERF_POLICY)  # what train_vit.py's workers run
    from torchvision import transforms as T

    # torchvision's reference pipeline: the same augmentation, float32 normalized in the worker (what ours did
    # before uint8)
    float_tf = T.Compose([uint8_tf, T.ConvertImageDtype(torch.float32),
                          T.Normalize(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)])
    steps = args.images // args.batch_size + skip + 2

    def ours(transform, repeats=1):
        return wds_loader.train_loader(train, transform, batch_size=args.batch_size, micro_batches=steps,
                                       readers=Readers(0, 1, args.workers), seed=0, repeats=repeats)

    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(shards_dir / "src" / "train"), transform=float_tf)
    tv = torch.utils.data.DataLoader(folder, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                     drop_last=True, persistent_workers=False)
    files = sorted((shards_dir / "src" / "train").glob("*/*.JPEG"))

    loaders = {
        "imagefolder_float": lambda: rate(tv, args.images, skip),
        "ours_float": lambda: rate(ours(float_tf), args.images, skip),
        "ours_uint8": lambda: rate(ours(uint8_tf), args.images, skip),
        "ours_uint8_ra3": lambda: rate(ours(uint8_tf, 3), args.images, skip),
        "single_core_uint8": lambda: single_core_rate(files, uint8_tf, args.images // 4),
    }
    if not args.no_dali:
        cpu = torch.device("cpu")
        loaders["dali_cpu_ra"] = lambda: dali_rate(train, args, "rand-m9-mstd0.5", cpu, args.images)
        loaders["dali_cpu_no_ra"] = lambda: dali_rate(train, args, None, cpu, args.images)
        if torch.cuda.is_available():
            gpu = torch.device("cuda", 0)
            loaders["dali_gpu_ra"] = lambda: dali_rate(train, args, "rand-m9-mstd0.5", gpu, 4 * args.images)
    if args.only:
        keep = {"imagefolder_float", *args.only.split(",")}
        if keep - set(loaders):
            p.error(f"unknown --only rows {sorted(keep - set(loaders))}; known here: {', '.join(loaders)}")
        loaders = {k: v for k, v in loaders.items() if k in keep}
    figures = {k: [] for k in loaders}
    for _ in range(args.rounds):  # rounds alternate the loaders so machine noise hits all alike
        for name, measure in loaders.items():
            figures[name].append(measure())
    med = {k: statistics.median(v) for k, v in figures.items()}
    for k, v in figures.items():
        print(f"{k:18s} median {med[k]:8.1f} img/s   x ImageFolder {med[k] / med['imagefolder_float']:.2f}   "
              f"rounds: {', '.join(f'{x:.1f}' for x in v)}")
    out = {"bench": "loader", "img_size": args.img_size, "workers": args.workers, "batch_size": args.batch_size,
           "images_per_round": args.images, "rounds": args.rounds,
           **{f"{k}_img_s": round(v, 1) for k, v in med.items()},
           **{f"ratio_{k}_vs_imagefolder": round(v / med["imagefolder_float"], 3) for k, v in med.items()
              if k != "imagefolder_float"},
           **({"cores_per_1000_img_s": round(1000 / med["single_core_uint8"], 2),
               "ratio_ours_uint8_vs_workers_x_single_core":
                   round(med["ours_uint8"] / (args.workers * med["single_core_uint8"]), 3)}
              if {"single_core_uint8", "ours_uint8"} <= set(med) else {})}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
