#!/usr/bin/env python
"""What each `--aa` policy costs a loader worker: JPEG decode + the train transform of the same demo images on one
core, the policies side by side in alternating rounds (medians): FlagPerf's `ra` (torchvision's RandAugment,
2 ops at 9 of 31), timm's `rand-m9-mstd0.5` (the default before), and `none` (crop and flip only).

    python bench/augment.py                    # 224 px, 300 images, 5 rounds
    python bench/augment.py --img-size 64
"""
import argparse
import io
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from vitbench.data import demo, shardformat, shardread, transforms

REPO = Path(__file__).resolve().parent.parent

POLICIES = ("ra", "rand-m9-mstd0.5", "none")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    shards = demo.build(REPO / "bench" / "out" / "demo-augment", train_per_class=30, val_per_class=1, progress=False)
    train = shardformat.load_split(shards, "train")
    jpegs = [s["jpg"] for url in train.urls for s in shardread.tar_samples(url, shardread.SkipLog())][:args.images]
    tfs = {name: transforms.train_transform(args.img_size, name) for name in POLICIES}
    rates = {name: [] for name in POLICIES}
    for _ in range(args.rounds):
        for name, tf in tfs.items():
            t = time.perf_counter()
            for data in jpegs:
                tf(Image.open(io.BytesIO(data)).convert("RGB"))
            rates[name].append(len(jpegs) / (time.perf_counter() - t))
    base = statistics.median(rates["ra"])
    print(f"{len(jpegs)} demo JPEGs, {args.img_size} px, one core, {args.rounds} alternating rounds")
    print("| --aa | images/s (median) | / ra |\n|---|---|---|")
    for name in POLICIES:
        m = statistics.median(rates[name])
        print(f"| {name} | {m:.1f} | {m / base:.3f} |")


if __name__ == "__main__":
    main()
