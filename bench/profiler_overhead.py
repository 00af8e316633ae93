#!/usr/bin/env python
"""Cost of the step profiler + W&B logging on step time, measured side by side in one process.

A ViT training step (forward, backward, AdamW) is run in alternating blocks: plain, and with exactly
the per-step calls train_vit.py makes (profiler windows every step; a profiler row, console line and
W&B offline row every --log-interval steps). The median ratio of adjacent blocks is the overhead; the
same calls are also timed on their own, which bounds it without the machine's noise.

    python bench/profiler_overhead.py [--blocks 8] [--steps-per-block 40] [--log-interval 20]

The last line is JSON.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

from vitbench import metrics as M
from vitbench.device import Device
from vitbench.profiler import StepTimer
from vitbench.tracking import Tracker, TrackingSpec


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=8, help="blocks per variant, alternating")
    p.add_argument("--steps-per-block", type=int, default=40)
    p.add_argument("--log-interval", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=64)
    args = p.parse_args()

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=args.img_size, patch_size=8, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch_size,))
    device = torch.device("cpu")

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    run_dir = Path(tempfile.mkdtemp(prefix="vitbench-overhead-"))
    tracker = Tracker(TrackingSpec("offline", "vitbench-bench", None, None), enabled=True, run_dir=run_dir,
                      name="overhead", config={})
    prof = StepTimer(global_batch=args.batch_size, world_size=1, memory_probe=M.DeviceMemoryMonitor(Device(), device).probe)
    prof.train_start()
    logged = [0]

    def plain_block():
        for _ in range(args.steps_per_block):
            step()

    def profiled_block():
        for _ in range(args.steps_per_block):
            prof.data_start()
            prof.compute_start()
            loss = step()
            prof.step_end()
            if prof.steps % args.log_interval == 0:
                row = prof.interval_row()
                row["loss"] = loss.item()
                tracker.log_step(prof.steps, row)
                logged[0] += 1
                print(f"step {prof.steps} {row[M.THROUGHPUT]:.1f} img/s", end="\r")

    for _ in range(3):  # warm-up: allocator, oneDNN kernels
        step()
    times = {"plain": [], "profiled": []}
    for i in range(args.blocks):
        for name, block in (("plain", plain_block), ("profiled", profiled_block))[:: 1 if i % 2 == 0 else -1]:
            t = time.perf_counter()
            block()
            times[name].append((time.perf_counter() - t) / args.steps_per_block)
    # The same calls timed directly (no training step in between): a noise-free upper bound.
    n = 20000
    t = time.perf_counter()
    for _ in range(n):
        prof.data_start()
        prof.compute_start()
        prof.step_end()
    hot_us = 1e6 * (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(50):
        tracker.log_step(prof.steps, prof.interval_row())
    row_us = 1e6 * (time.perf_counter() - t) / 50
    tracker.finish({}, ([], []))
    med = {k: statistics.median(v) for k, v in times.items()}
    # Each pair of adjacent blocks shares the machine's state of the moment: their ratio cancels drift.
    pair_ratio = statistics.median(a / b for a, b in zip(times["profiled"], times["plain"]))
    print()
    for k, v in times.items():
        print(f"{k:9s} median {1000 * med[k]:.2f} ms/step   blocks: {', '.join(f'{1000 * t:.1f}' for t in v)}")
    out = {"bench": "profiler_overhead", "step_ms_plain": round(1000 * med["plain"], 3),
           "step_ms_profiled": round(1000 * med["profiled"], 3), "wandb_rows": logged[0],
           "log_interval": args.log_interval, "ratio_profiled_vs_plain": round(pair_ratio, 4),
           "overhead_pct": round(100 * (pair_ratio - 1), 2),
           "hot_path_us_per_step": round(hot_us, 2), "row_and_wandb_log_us": round(row_us, 1),
           "direct_overhead_pct": round(100 * (hot_us + row_us / args.log_interval) / (1e6 * med["plain"]), 4)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
