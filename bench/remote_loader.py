#!/usr/bin/env python
"""The train loader reading the same shards from a local copy, from an HTTP server and from an S3 server (moto),
both on loopback, side by side: the same demo draw, training transform (RandomResizedCrop + flip + RandAugment
m9), batch size and workers. Rounds alternate the three so machine noise hits all alike; medians and the
remote/local ratios are reported (goal: >= 0.95 with 2 workers). The servers are the ones the tests use
(tests/servers.py); loopback measures what our reading costs, not a network.

    python bench/remote_loader.py [--workers 2] [--images 1536] [--rounds 3] [--per-class 200]

The last line is JSON with the figures and ratios.
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from vitbench.data import demo, shardformat, transforms, wds_loader
from vitbench.data.shardread import Readers
from vitbench.testing.servers import FileServer, S3Server

from loader import rate

HERE = Path(__file__).resolve().parent


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=1536, help="images timed per loader and round")
    p.add_argument("--per-class", type=int, default=200, help="demo train images per class (10 classes)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)

    shards_dir = demo.build(HERE / "out" / f"demo-{args.per_class}", train_per_class=args.per_class,
                            val_per_class=1, progress=False)
    http = FileServer(shards_dir)
    s3 = S3Server(shards_dir)
    os.environ.update(s3.env)
    skip = 2 * args.workers + 4
    steps = args.images // args.batch_size + skip + 2
    tf = transforms.train_transform(args.img_size, transforms.FLAGPERF_POLICY)

    def measure(where):
        """img/s, and the CPU seconds this process spent meanwhile: the servers' threads (and the batch hand-over,
        the same for all three), on the cores the loader workers need too."""
        train = shardformat.load_split(where, "train")
        cpu = time.process_time()
        img_s = rate(wds_loader.train_loader(train, tf, batch_size=args.batch_size, micro_batches=steps,
                                             readers=Readers(0, 1, args.workers), seed=0), args.images, skip)
        return img_s, time.process_time() - cpu

    sources = {"local": str(shards_dir), "http": http.url, "s3": s3.url}
    figures, server_cpu = {k: [] for k in sources}, {k: [] for k in sources}
    try:
        for _ in range(args.rounds):
            for name, where in sources.items():
                img_s, cpu_s = measure(where)
                figures[name].append(img_s)
                server_cpu[name].append(cpu_s)
    finally:
        http.close()
        s3.close()
    med = {k: statistics.median(v) for k, v in figures.items()}
    for k, v in figures.items():
        print(f"{k:6s} median {med[k]:7.1f} img/s   x local {med[k] / med['local']:.3f}   "
              f"rounds: {', '.join(f'{x:.1f}' for x in v)}   main-process CPU s/round (servers): "
              f"{statistics.median(server_cpu[k]):.2f}")
    print(json.dumps({"bench": "remote_loader", "img_size": args.img_size, "workers": args.workers,
                      "batch_size": args.batch_size, "images_per_round": args.images, "rounds": args.rounds,
                      **{f"{k}_img_s": round(v, 1) for k, v in med.items()},
                      "ratio_http_vs_local": round(med["http"] / med["local"], 3),
                      "ratio_s3_vs_local": round(med["s3"] / med["local"], 3),
                      **{f"main_process_cpu_s_{k}": round(statistics.median(v), 2) for k, v in server_cpu.items()}}))


if __name__ == "__main__":
    main()
