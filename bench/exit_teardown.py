#!/usr/bin/env python
"""What a trainer process's exit costs after its work is done, with and without `gc.freeze()` (vitbench/cli.py's
run freezes the collector once main returns), measured side by side in one run.

Each trial is a fresh process that imports the trainer's stack (train_vit.py's imports), builds a ViT and a
DeepSpeed-sized optimizer state, prints a mark, and exits, frozen or not, alternating. The figure is the time
from the mark to the process's end, as the launcher sees it.

    python bench/exit_teardown.py [--trials 5] [--model vit_tiny_patch16_224]

The last line is JSON.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

CHILD = """
import gc, sys
import timm, torch, accelerate, deepspeed, torchvision, wandb, webdataset  # the trainer's stack
model = timm.create_model(sys.argv[1], num_classes=1000)
opt = torch.optim.AdamW(model.parameters())
model(torch.randn(2, 3, 224, 224)).sum().backward()
opt.step()
if sys.argv[2] == "frozen":
    gc.freeze()
print("done", flush=True)
"""


def exit_seconds(model: str, variant: str) -> float:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, model, variant], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    while proc.stdout.readline().strip() != "done":  # libraries print too
        assert proc.poll() is None, "the trial process failed"
    marked = time.perf_counter()
    proc.wait()
    assert proc.returncode == 0
    return time.perf_counter() - marked


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=5, help="processes per variant, alternating")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    args = p.parse_args()
    times = {"plain": [], "frozen": []}
    for _ in range(args.trials):
        for variant in times:
            times[variant].append(exit_seconds(args.model, variant))
    med = {v: statistics.median(t) for v, t in times.items()}
    for v, t in times.items():
        print(f"{v:7s} exit: median {med[v]:.2f} s  ({', '.join(f'{x:.2f}' for x in t)})")
    print(f"saved per process exit: {med['plain'] - med['frozen']:.2f} s ({med['plain'] / med['frozen']:.1f}x)")
    print(json.dumps({"model": args.model, "trials": args.trials, "exit_s": times, "median_s": med}))


if __name__ == "__main__":
    main()
