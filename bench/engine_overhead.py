#!/usr/bin/env python
"""What the DeepSpeed engine costs per optimizer step against a plain PyTorch step of the same model and batch,
side by side in one process (one rank, gloo), rounds alternating, medians: for fp32, amp and bf16, ZeRO-0 (what
one process runs) and ZeRO-1 (what the Plan would run at one process if ZeRO-1 were not pure overhead there).

    python bench/engine_overhead.py                       # ViT-S/16 at 64 px, batch 32 (CPU-sized)
    python bench/engine_overhead.py --model vit_tiny_patch16_224 --img-size 32 --batch-size 8   # fixed costs

Prints a table of ms per step and the ratio to the plain step of the same precision.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from vitbench import dsconfig, precision
from vitbench.runinfo import free_port

from ceiling import plain_step

REPO = Path(__file__).resolve().parent.parent

VARIANTS = {  # name: (engine, precision label, ZeRO stage)
    **{f"plain {label}": ("plain", label, None) for label in ("fp32", "amp", "bf16")},
    **{f"deepspeed {label} ZeRO-{stage}": ("deepspeed", label, stage) for label in ("fp32", "amp", "bf16")
       for stage in (0, 1)},
}


def make_step(kind, label, stage, args):
    """One optimizer step as a function: the plain PyTorch step (bench/ceiling.py's), or the trainer's
    DeepSpeed wiring (our config, optim.make_optimizer, optim.attach) driven like train_vit.train_step."""
    import deepspeed
    import timm

    from vitbench import optim as recipe

    torch.manual_seed(0)
    model = timm.create_model(args.model, img_size=args.img_size, num_classes=1000, **args.kwargs)
    spec = precision.SPECS[label]
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, dtype=spec.input_dtype)
    y = torch.randint(0, 1000, (args.batch_size,))
    if kind == "plain":
        return plain_step(model, spec, x, y)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.11)
    optimizer = recipe.make_optimizer(model.parameters(), precision=spec, lr=1e-4, weight_decay=0.3, clip_grad=1.0,
                                      loss_scaling={} if spec.loss_scaler == "vitbench" else None, device="cpu")
    cfg = dsconfig.build(dsconfig.DS_CONFIG_DIR / "zero1.json", micro_batch=args.batch_size, grad_accum=1,
                         world_size=1, clip_grad=1.0, precision=spec, zero_stage=stage)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    recipe.attach(engine, optimizer, world_size=1, zero_stage=stage)

    def one_step():
        loss = loss_fn(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
    return one_step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model-kwargs", nargs="*", default=[], help="KEY=INT, e.g. depth=6")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--labels", default="fp32,amp,bf16", help="precisions to compare (amp is slow on most CPUs)")
    args = p.parse_args()
    args.kwargs = {k: int(v) for k, v in (kv.split("=") for kv in args.model_kwargs)}
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    steps = {name: make_step(*v, args) for name, v in VARIANTS.items() if v[1] in args.labels.split(",")}
    for name, step in steps.items():  # warm-up: allocator, kernels' first calls
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        print(f"warm-up {name}: {1000 * (time.perf_counter() - t0) / 3:.0f} ms/step", file=sys.stderr, flush=True)
    times = {name: [] for name in steps}
    for _ in range(args.rounds):  # alternate the variants: machine noise falls on all alike
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append(1000 * (time.perf_counter() - t0) / args.steps)
    ms = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.model} {args.img_size}px batch {args.batch_size} {args.kwargs or ''}, {args.rounds} rounds x "
          f"{args.steps} steps, median ms per step (rounds: min-max)\n")
    print("| variant | ms/step | rounds | vs plain step of its precision |\n|---|---|---|---|")
    for name, value in ms.items():
        base = ms[f"plain {VARIANTS[name][1]}"]
        print(f"| {name} | {value:.1f} | {min(times[name]):.1f}-{max(times[name]):.1f} | {base / value:.3f}x |")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
