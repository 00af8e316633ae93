#!/usr/bin/env python
"""What the DeepSpeed engine costs per optimizer step against a plain PyTorch step of the same model and batch,
side by side in one process (one rank, gloo), rounds alternating, medians. Ways of running a 16-bit step are
compared too: DeepSpeed's bf16 mode (bf16 weights, fp32 master copies, what `--precision bf16` runs) against
DeepSpeed's torch_autocast mode with bf16 (fp32 weights, bf16 autocast: the plain-PyTorch way).

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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from vitbench import dsconfig, precision  # noqa: E402
from vitbench.runinfo import free_port  # noqa: E402

VARIANTS = {  # name: (engine, precision label, ZeRO stage, bf16 through autocast instead of bf16 weights)
    "plain fp32": ("plain", "fp32", None, False),
    "deepspeed fp32 ZeRO-0": ("deepspeed", "fp32", 0, False),
    "deepspeed fp32 ZeRO-1": ("deepspeed", "fp32", 1, False),
    "plain bf16 autocast": ("plain", "bf16", None, True),
    "deepspeed bf16 weights ZeRO-0": ("deepspeed", "bf16", 0, False),
    "deepspeed bf16 weights ZeRO-1": ("deepspeed", "bf16", 1, False),
    "deepspeed bf16 autocast ZeRO-0": ("deepspeed", "fp32", 0, True),
    "deepspeed bf16 autocast ZeRO-1": ("deepspeed", "fp32", 1, True),
}


def make_step(kind, label, stage, autocast_bf16, args):
    import deepspeed
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model, img_size=args.img_size, num_classes=1000, **args.kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.3, fused=True)
    spec = precision.SPECS[label]
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, dtype=spec.input_dtype)
    y = torch.randint(0, 1000, (args.batch_size,))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.11)
    if kind == "plain":
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
                loss = loss_fn(model(x).float(), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step
    cfg = dsconfig.build(dsconfig.DS_CONFIG_DIR / "zero1.json", micro_batch=args.batch_size, grad_accum=1,
                         world_size=1, clip_grad=1.0, precision=spec, zero_stage=stage)
    if autocast_bf16:
        cfg["torch_autocast"] = {"enabled": True, "dtype": "torch.bfloat16"}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)

    def step():
        loss = loss_fn(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
    return step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model-kwargs", nargs="*", default=[], help="KEY=INT, e.g. depth=6")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    args.kwargs = {k: int(v) for k, v in (kv.split("=") for kv in args.model_kwargs)}
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    steps = {name: make_step(*v, args) for name, v in VARIANTS.items()}
    for step in steps.values():  # warm-up: allocator, kernels' first calls
        for _ in range(3):
            step()
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
        base = ms["plain bf16 autocast" if "bf16" in name else "plain fp32"]
        print(f"| {name} | {value:.1f} | {min(times[name]):.1f}-{max(times[name]):.1f} | {base / value:.3f}x |")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
