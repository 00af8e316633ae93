#!/usr/bin/env python
"""Train-loader throughput: our WebDataset reader against torchvision's ImageFolder, side by side.

Same demo images (a larger draw: 300 per class), same training transform (RandomResizedCrop + flip +
RandAugment m9 + normalize), same
batch size and number of workers. Also the single-core decode + transform rate (the per-worker limit)
and our reader with repeated augmentation x3 (decodes each image once for three samples).
Rounds alternate the loaders so machine noise hits all of them alike; medians are reported.

    python bench/loader.py [--img-size 224] [--workers 2] [--images 1536] [--rounds 3]

The last line is JSON with the figures and ratios.
"""
import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from vitbench import data, demo  # noqa: E402


def rate(loader, images: int, skip_batches: int = 4) -> float:
    """Steady-state images/s: worker start-up and buffer filling (the first batches) are not timed."""
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=2048, help="images timed per loader and round")
    p.add_argument("--per-class", type=int, default=300, help="demo train images per class (10 classes)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)

    shards_dir = demo.build(Path(__file__).resolve().parent / "out" / f"demo-{args.per_class}",
                            train_per_class=args.per_class, val_per_class=1, progress=False)
    if args.per_class * len(demo.PHOTOS) < args.images + 5 * args.batch_size:
        p.error("--per-class too small: ImageFolder's epoch must outlast the timed window")
    train = data.load_split(shards_dir, "train")
    transform = data.train_transform(args.img_size, "rand-m9-mstd0.5")
    steps = args.images // args.batch_size + 6

    def ours(repeats):
        return data.train_loader(train, transform, args.batch_size, steps, rank=0, world_size=1, workers=args.workers,
                                 seed=0, epoch=0, repeats=repeats)

    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(shards_dir / "src" / "train"), transform=transform)
    tv = torch.utils.data.DataLoader(folder, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                     drop_last=True, persistent_workers=False)
    files = sorted((shards_dir / "src" / "train").glob("*/*.JPEG"))

    figures = {"webdataset": [], "imagefolder": [], "webdataset_ra3": [], "single_core": []}
    for _ in range(args.rounds):
        figures["webdataset"].append(rate(ours(1), args.images))
        figures["imagefolder"].append(rate(tv, args.images))
        figures["webdataset_ra3"].append(rate(ours(3), args.images))
        figures["single_core"].append(single_core_rate(files, transform, args.images // 4))
    med = {k: statistics.median(v) for k, v in figures.items()}
    for k, v in figures.items():
        print(f"{k:16s} median {med[k]:8.1f} img/s   rounds: {', '.join(f'{x:.1f}' for x in v)}")
    out = {"bench": "loader", "img_size": args.img_size, "workers": args.workers, "batch_size": args.batch_size,
           "images_per_round": args.images, "rounds": args.rounds,
           **{f"{k}_img_s": round(v, 1) for k, v in med.items()},
           "ratio_webdataset_vs_imagefolder": round(med["webdataset"] / med["imagefolder"], 3),
           "ratio_webdataset_vs_workers_x_single_core":
               round(med["webdataset"] / (args.workers * med["single_core"]), 3),
           "ratio_ra3_vs_webdataset": round(med["webdataset_ra3"] / med["webdataset"], 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
