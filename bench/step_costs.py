#!/usr/bin/env python
"""What one steady optimizer step costs beyond the model, per precision x ZeRO stage, at one process (gloo), on
CPU: host read-backs (each a device synchronization on a GPU), bytes written and kernel launches, against a
plain PyTorch step of the same model, batch and precision (bench/ceiling.py's step: autocast, GradScaler for
fp16, clip_grad_norm_, fused AdamW).

    python bench/step_costs.py                    # the trainer's wiring (vitbench/optim.py)
    python bench/step_costs.py --wiring before    # the wiring before it (DeepSpeed clips; bf16 weights)

Read-backs: calls of Tensor.item/__bool__/__float__/__int__/__index__/tolist/cpu/numpy during the step.
Bytes and launches: every aten op the step dispatches (torch's dispatcher, so DeepSpeed's copies and gloo's
collectives count too); bytes are what an op writes (its fresh outputs and the arguments it mutates), a launch
is an op that writes anything (views are free). Printed per parameter and per parameter tensor, as the step's
total minus the plain step's: the model's own forward and backward cancel out.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vitbench import dsconfig, optim, precision
from vitbench.runinfo import free_port
from vitbench.testing.readbacks import CountReadbacks

from ceiling import plain_step

REPO = Path(__file__).resolve().parent.parent

def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class CountWrites(TorchDispatchMode):
    """Launches and bytes written by every aten op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.launches = self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        written = 0
        for arg, value in zip(schema.arguments, list(args) + [kwargs.get(a.name) for a in
                                                             schema.arguments[len(args):]]):
            if arg.alias_info is not None and arg.alias_info.is_write:
                written += _nbytes(_tensors(value))
        outs = out if isinstance(out, (list, tuple)) else [out]
        for ret, value in zip(schema.returns, outs):
            if ret.alias_info is None:  # a fresh tensor (an aliasing return is a view or the mutated argument)
                written += _nbytes(_tensors(value))
        if written:
            self.launches += 1
            self.bytes += written
        return out


def before_config(spec, stage: int, clip: float) -> dict:
    """The DeepSpeed config the trainer built before vitbench/optim.py: DeepSpeed clips, the shipped
    overlap_comm, DeepSpeed's bf16 weights for --precision bf16."""
    import json as _json

    cfg = _json.loads((dsconfig.DS_CONFIG_DIR / f"zero{stage}.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=ARGS.batch_size, gradient_accumulation_steps=1,
               train_batch_size=ARGS.batch_size, gradient_clipping=clip, timers={"throughput": {"enabled": False}})
    cfg["fp16"] = {"enabled": spec.label == "fp16"}
    cfg["bf16"] = {"enabled": spec.label == "bf16"}
    cfg["torch_autocast"] = {"enabled": spec.label == "amp", "dtype": "torch.float16"} if spec.label == "amp" else \
        {"enabled": False}
    return cfg


def measure(kind: str, label: str, stage: int | None) -> dict:
    import deepspeed
    import timm

    spec = precision.SPECS[label]
    torch.manual_seed(0)
    model = timm.create_model(ARGS.model, img_size=ARGS.img_size, patch_size=ARGS.patch_size, num_classes=100)
    n_params, n_tensors = sum(p.numel() for p in model.parameters()), len(list(model.parameters()))
    x = torch.randn(ARGS.batch_size, 3, ARGS.img_size, ARGS.img_size)
    y = torch.randint(0, 100, (ARGS.batch_size,))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.11)
    if kind == "plain":
        one_step = plain_step(model, spec, x, y)
    else:
        if kind == "before":
            if spec.label == "bf16":
                model = model.bfloat16()
                x = x.bfloat16()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.3, fused=True)
            cfg = before_config(spec, stage, 1.0)
        else:
            opt = optim.make_optimizer(model.parameters(), precision=spec, lr=1e-4, weight_decay=0.3, clip_grad=1.0,
                                      loss_scaling={} if spec.loss_scaler == "vitbench" else None, device="cpu")
            cfg = dsconfig.build(dsconfig.DS_CONFIG_DIR / "zero1.json", micro_batch=ARGS.batch_size, grad_accum=1,
                                 world_size=1, clip_grad=1.0, precision=spec, zero_stage=stage)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        if kind == "ours":
            optim.attach(engine, opt, world_size=1, zero_stage=stage)

        def one_step():
            loss = loss_fn(engine(x).float(), y)
            engine.backward(loss)
            engine.step()
    for _ in range(3):  # warm-up: lazy optimizer state, first-call paths
        one_step()
    with CountReadbacks() as readbacks, CountWrites() as writes:
        one_step()
    return {"readbacks": len(readbacks.calls), "bytes": writes.bytes, "launches": writes.launches,
            "params": n_params, "tensors": n_tensors}


def main() -> int:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wiring", choices=["ours", "before"], default="ours")
    p.add_argument("--model", default="vit_small_patch16_224", help="ViT-S/16: the 152 tensors of ViT-B/16")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--labels", default="fp32,amp,bf16")
    p.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    ARGS = p.parse_args()
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    rows = {}
    for label in ARGS.labels.split(","):
        plain = measure("plain", label, None)
        rows[f"plain {label}"] = {**plain, "extra_bytes_per_param": 0.0, "extra_launches_per_tensor": 0.0}
        for stage in (0, 1, 2):
            r = measure(ARGS.wiring, label, stage)
            r["extra_bytes_per_param"] = (r["bytes"] - plain["bytes"]) / r["params"]
            r["extra_launches_per_tensor"] = (r["launches"] - plain["launches"]) / r["tensors"]
            rows[f"{ARGS.wiring} {label} ZeRO-{stage}"] = r
    if ARGS.json:
        print(json.dumps(rows))
    else:
        first = next(iter(rows.values()))
        print(f"{ARGS.model} {ARGS.img_size}px patch {ARGS.patch_size}, batch {ARGS.batch_size}: {first['params']} "
              f"parameters in {first['tensors']} tensors; one steady step, one process\n")
        print("| step | read-backs | bytes written beyond the plain step, per parameter | launches beyond the plain "
              "step, per tensor |\n|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['readbacks']} | {r['extra_bytes_per_param']:+.1f} | "
                  f"{r['extra_launches_per_tensor']:+.1f} |")
    dist.destroy_process_group()
    return 0


ARGS = None
if __name__ == "__main__":
    sys.exit(main())
