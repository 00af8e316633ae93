#!/usr/bin/env python
"""train_vit.py against timm's own train.py on the same work: same shards, model, image size, batch, loader
workers, augmentation, optimizer, schedule and precision; the two run alternately, several rounds.

    python bench/vs_timm.py --timm PATH_TO_TIMM_CHECKOUT [--rounds 5] [--device cpu|cuda]

Nothing is fetched at run time: PATH is a checkout of huggingface/pytorch-image-models; its train.py runs
with that checkout first on PYTHONPATH (the library it was written for). The figure compared is each
trainer's own training throughput over the epoch, evaluation excluded: timm's epoch-average `img/s`
(global batch / mean update time, the last `Train:` line of each epoch) and our `p_train`
(samples / (train window - evaluation and checkpoint pauses)). Both windows include the loader's start.
Also compared: the same figures leaving out each epoch's first 6 updates (steady state: what a long run
sees), from timm's running means and our p_train_steady.
With --deepspeed-timer our run also turns on DeepSpeed's ThroughputTimer (it synchronizes each step)
and prints it next to our p_core as a second opinion.

On a CPU the default is the issue's setting: one process, fp32, ViT-Tiny with 8 px patches at 64 px,
batch 64, 2 loader workers, RandAugment m9, 1 epoch over 3,000 demo images (built once under bench/out).
On a GPU (--device cuda) timm runs with its GPU prefetcher (uint8 batches normalized on the device, as ours).
The last line is JSON.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


TIMM_EPOCH_RATE = re.compile(r"Train: (\d+) \[\s*(\d+)/(\d+) .*\(([\d.]+)s,\s*([\d.]+)/s\)")
WARMUP = 6  # updates left out of the steady figures on both sides (timm logs update 5, the 6th)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timm", required=True, help="path of a huggingface/pytorch-image-models checkout")
    p.add_argument("--data-dir", default=None, help="shards with _info.json (default: 3,000 demo images)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "amp"], default="fp32",
                   help="amp: fp16 autocast + loss scaling on both sides (timm's --amp)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both (default: all cores)")
    p.add_argument("--deepspeed-timer", action="store_true", help="also record DeepSpeed's ThroughputTimer")
    return p.parse_args()


def demo_shards() -> Path:
    """bench/loader.py's draw (the same call, so the two benchmarks share one build); validation is outside
    both figures compared, so one image per class is enough there."""
    from vitbench.data import demo

    return demo.build(REPO / "bench" / "out" / "demo-300", train_per_class=300, val_per_class=1, progress=False)


def shared_recipe(a) -> dict:
    """The settings both trainers get (our flag names; timm's are the same except where mapped below)."""
    return {"lr": "1e-3", "weight-decay": "0.05", "smoothing": "0.1", "mixup": "0", "cutmix": "0",
            "aa": "rand-m9-mstd0.5", "warmup-epochs": "0", "clip-grad": "1.0", "epochs": str(a.epochs),
            "batch-size": str(a.batch_size), "workers": str(a.workers), "seed": "42"}


def timm_command(a, data: Path, out: Path) -> list[str]:
    recipe = shared_recipe(a)
    cmd = [sys.executable, str(Path(a.timm) / "train.py"), "--data-dir", str(data), "--dataset", "wds/demo",
           "--train-split", "train", "--val-split", "validation", "--model", a.model,
           "--model-kwargs", f"patch_size={a.patch_size}", f"img_size={a.img_size}", "--img-size", str(a.img_size),
           "--opt", "adamw", "--sched", "cosine", "--reprob", "0", "--train-interpolation", "bilinear",
           "--interpolation", "bilinear", "--log-interval", "5", "--output", str(out), "--checkpoint-hist", "1",
           "--device", a.device]
    for key, value in recipe.items():
        cmd += [f"--{key}", value]
    if a.device == "cpu":
        cmd.append("--no-prefetcher")  # timm's prefetcher needs CUDA
    if a.precision == "amp":
        cmd += ["--amp", "--amp-dtype", "float16"]
    return cmd


def ours_command(a, data: Path, out: Path) -> list[str]:
    recipe = shared_recipe(a)
    cmd = [sys.executable, str(REPO / "train_vit.py"), "--data-dir", str(data), "--model", a.model,
           "--patch-size", str(a.patch_size), "--img-size", str(a.img_size), "--global-batch-size", str(a.batch_size),
           "--aug-repeats", "1", "--precision", a.precision, "--wandb", "off", "--log-interval", "5",
           "--output-dir", str(out), "--target-acc1", "101", "--timing-warmup-steps", str(WARMUP)]
    for key, value in recipe.items():
        cmd += [f"--{key}", value]
    if a.deepspeed_timer:
        cmd.append("--deepspeed-throughput-timer")
    return cmd


def run(cmd, env, log: Path) -> str:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    text = log.read_text()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:2])} failed with status {proc.returncode}; see {log}\n{text[-2000:]}")
    return text


def timm_rates(text: str, batch: int) -> tuple[float, float]:
    """(img/s over every update, img/s leaving out each epoch's first WARMUP updates). timm logs the running
    mean update time at update k, so the time of updates 0..k is (k + 1) x that mean."""
    spans = {}  # epoch -> {update index: running mean}
    for m in TIMM_EPOCH_RATE.finditer(text):
        spans.setdefault(int(m[1]), {})[int(m[2])] = float(m[4])
    if not spans:
        raise SystemExit("no `Train:` line with an epoch average in timm's output")
    updates = total = steady_updates = steady_total = 0.0
    for means in spans.values():
        last = max(means)
        updates += last + 1
        total += (last + 1) * means[last]
        if WARMUP - 1 not in means:
            raise SystemExit(f"timm's log has no line at update {WARMUP - 1} (use --log-interval 5)")
        steady_updates += last + 1 - WARMUP
        steady_total += (last + 1) * means[last] - WARMUP * means[WARMUP - 1]
    return updates * batch / total, steady_updates * batch / steady_total


def main():
    a = parse_args()
    data = Path(a.data_dir) if a.data_dir else demo_shards()
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env["TORCH_EXTENSIONS_DIR"] = env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    timm_env = {**env, "PYTHONPATH": os.pathsep.join([str(Path(a.timm).resolve()), env.get("PYTHONPATH", "")])}
    ours_env = env  # the installed project (make setup), not timm's checkout
    rows = []
    with tempfile.TemporaryDirectory(prefix="vs_timm-") as tmp:
        tmp = Path(tmp)
        for i in range(a.rounds):
            order = ["timm", "ours"] if i % 2 == 0 else ["ours", "timm"]  # alternate who goes first
            row = {}
            for who in order:
                out = tmp / f"{who}{i}"
                if who == "timm":
                    row["timm"], row["timm_steady"] = timm_rates(
                        run(timm_command(a, data, out), timm_env, tmp / f"timm{i}.log"), a.batch_size)
                else:
                    run(ours_command(a, data, out), ours_env, tmp / f"ours{i}.log")
                    r = json.loads((out / "results.json").read_text())
                    row.update(ours=r["p_train"], ours_steady=r["p_train_steady"], ours_core=r["p_core_steady"])
                    if a.deepspeed_timer:
                        row["deepspeed_timer"] = r["deepspeed_throughput_timer"]["samples_per_sec"]
            row["ratio"] = row["ours"] / row["timm"]
            row["ratio_steady"] = row["ours_steady"] / row["timm_steady"]
            rows.append(row)
            print(f"round {i + 1}: timm {row['timm']:.1f} img/s, ours {row['ours']:.1f} img/s -> {row['ratio']:.3f}x;"
                  f" steady {row['timm_steady']:.1f} vs {row['ours_steady']:.1f} -> {row['ratio_steady']:.3f}x"
                  + (f"; p_core {row['ours_core']:.1f} vs DeepSpeed timer "
                                                f"{row['deepspeed_timer']:.1f}" if a.deepspeed_timer else ""),
                  flush=True)
    result = {"timm_img_s": statistics.median(r["timm"] for r in rows),
              "ours_img_s": statistics.median(r["ours"] for r in rows),
              "ratio_median": statistics.median(r["ratio"] for r in rows),
              "ratio_steady_median": statistics.median(r["ratio_steady"] for r in rows), "rounds": rows,
              "settings": {k: v for k, v in vars(a).items() if k != "timm"}}
    if a.deepspeed_timer:
        result["p_core_over_deepspeed_timer"] = statistics.median(r["ours_core"] / r["deepspeed_timer"] for r in rows)
    print(f"ours / timm train.py: {result['ratio_median']:.3f}x over the epoch, {result['ratio_steady_median']:.3f}x "
          f"after {WARMUP} warm-up updates (medians of {a.rounds} rounds)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
