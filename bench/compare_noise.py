#!/usr/bin/env python
"""How often `report.py compare` calls two identical launches different: N launches of one configuration on this
machine, every pair of them compared, the share of pairs whose p_core or p_train steady verdict is `faster` or
`slower` (the goal: at most 5%). Also the launch-to-launch spread of p_core steady, which sets the default
`--launch-noise`.

    python bench/compare_noise.py                    # 8 launches (28 pairs) of a tiny ViT, one process each
    python bench/compare_noise.py --launches 10 --steps 30

Pairs share launches, so they are not independent: the share is a rate on this machine, not a p-value.
"""
import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from vitbench import compare, stats
from vitbench.data import demo
from vitbench.reporting import load_results

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launches", type=int, default=8)
    p.add_argument("--steps", type=int, default=28, help="optimizer steps per launch (the steady window: all but 2)")
    p.add_argument("--launch-noise", type=float, default=100 * stats.DEFAULT_LAUNCH_NOISE, metavar="PCT")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="compare-noise-"))
    shards = demo.build(root / "shards", train_per_class=12, val_per_class=5, shard_size=7, progress=False)
    runs = []
    for i in range(args.launches):
        out = root / f"run{i}"
        subprocess.run([sys.executable, str(REPO / "train_vit.py"), "--model", "vit_tiny_patch16_224", "--img-size",
                        "32", "--patch-size", "8", "--model-kwargs", "depth=2", "--precision", "fp32", "--workers",
                        "1", "--aa", "none", "--data-dir", str(shards), "--batch-size", "8", "--global-batch-size",
                        "16", "--mixup", "0", "--cutmix", "0", "--max-steps", str(args.steps), "--epochs", "10",
                        "--timing-warmup-steps", "2", "--log-interval", "5", "--wandb", "off", "--output-dir", str(out),
                        "--run-name", f"run{i}", "--seed", str(i)], check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
        runs.append(out)
    rates = [r["p_core_steady"] for r in load_results(runs)]
    pairs = list(itertools.combinations(runs, 2))
    spread = statistics.pstdev(rates) / statistics.mean(rates)
    print(f"{args.launches} identical launches, {args.steps} steps each: p_core steady "
          f"{min(rates):.1f}-{max(rates):.1f} img/s (relative std {100 * spread:.1f}%)")
    for noise in sorted({args.launch_noise, 0.0, args.launch_noise / 2}, reverse=True):
        called = sum(called_different(a, b, noise / 100) for a, b in pairs)
        print(f"pairs called faster or slower at --launch-noise {noise:g}%: {called} of {len(pairs)} "
              f"({100 * called / len(pairs):.1f}%)")


def called_different(a: Path, b: Path, launch_noise: float) -> bool:
    base, (cand,) = compare.sides([a], [b])
    figures = compare.compare(base, cand, launch_noise=launch_noise)["figures"]
    return any(f["verdict"] in ("faster", "slower") for f in figures
               if f["figure"] in ("p_core_steady", "p_train_steady"))

if __name__ == "__main__":
    main()
