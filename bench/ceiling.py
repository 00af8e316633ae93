#!/usr/bin/env python
"""The ceiling: the same model, precision, micro-batch and compile setting as a train_vit.py row, trained by a
plain PyTorch step (synthetic batches already on the device, fused AdamW, gradient clipping, no DeepSpeed, no
accelerate, no data loader). `bench/gpu_sweep.py` runs it beside each of its rows and reports ours / ceiling
for p_core steady: what our machinery (DeepSpeed engine, profiler, per-step checks) costs on this hardware.

    python bench/ceiling.py --precision bf16 --batch-size 256 --steps 80 [--compile]   # on a GPU
    python bench/ceiling.py --cpu-smoke                                                  # tiny model, CPU

Prints one JSON line: {"img_per_s_steady", "step_ms_steady", ...}.

Precision, as plain PyTorch does it: fp32 (TF32 off), tf32 (TF32 on), amp and fp16 (fp32 weights, fp16
autocast, GradScaler), bf16 (fp32 weights, bf16 autocast: what ours runs too).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vitbench.precision import SPECS, set_tf32

REPO = Path(__file__).resolve().parent.parent

TINY = dict(model="vit_tiny_patch16_224", img_size=32, model_kwargs={"patch_size": 8, "depth": 2}, batch_size=8,
            steps=6, warmup=2)


def plain_step(model, spec, x, y, *, device_type: str = "cpu", forward=None, clip: float = 1.0):
    """One plain PyTorch training step of MODEL on the batch (X, Y) as a function: autocast to the precision's
    compute dtype, a GradScaler for fp16, clip_grad_norm_, fused AdamW. FORWARD: e.g. the compiled model."""
    forward = forward or model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.3, fused=True)
    autocast = spec.compute_dtype != torch.float32
    scaler = torch.amp.GradScaler(device_type, enabled=spec.compute_dtype == torch.float16)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.11)

    def step():
        with torch.autocast(device_type, dtype=spec.compute_dtype, enabled=autocast):
            loss = loss_fn(forward(x).float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure(model: str, img_size: int, batch_size: int, precision: str, steps: int, warmup: int,
            compile_model: bool = False, model_kwargs: dict | None = None, num_classes: int = 1000,
            device: str | None = None) -> dict:
    """Steady images/s of STEPS plain training steps after WARMUP more, on DEVICE (cuda when present)."""
    import timm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = SPECS[precision]
    set_tf32(spec.tf32)
    torch.manual_seed(0)
    net = timm.create_model(model, img_size=img_size, num_classes=num_classes, **(model_kwargs or {})).to(device)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    step = plain_step(net, spec, x, y, device_type=device.type, forward=torch.compile(net) if compile_model else None)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(warmup):  # compilation, allocator growth, cuDNN/cuBLAS autotuning
        step()
    sync()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - t0
    return {"model": model, "img_size": img_size, "batch_size": batch_size, "precision": precision,
            "compile": compile_model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "steps": steps, "warmup_steps": warmup, "warmup_s": compile_s,
            "img_per_s_steady": steps * batch_size / seconds, "step_ms_steady": 1000 * seconds / steps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", choices=list(SPECS), default="bf16")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny ViT on the CPU: the machinery, not a figure")
    args = p.parse_args()
    if args.cpu_smoke:
        row = measure(TINY["model"], TINY["img_size"], TINY["batch_size"], args.precision, TINY["steps"],
                      TINY["warmup"], model_kwargs=TINY["model_kwargs"], device="cpu")
    else:
        row = measure(args.model, args.img_size, args.batch_size, args.precision, args.steps, args.warmup,
                      args.compile)
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
