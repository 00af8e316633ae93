#!/usr/bin/env python
"""Minimal reproduction for DeepSpeed's maintainers: with `torch_autocast` (fp16) at ZeRO-1/2, gradient clipping
clips the *loss-scaled* gradients, so the optimizer applies a gradient of norm clip / loss_scale.

Standalone (torch + deepspeed only), one process, CPU or GPU:

    python docs/deepspeed-amp-clip.py            # deepspeed 0.19.8, torch 2.14.1: see the printed table

Cause (deepspeed 0.19.8, runtime/zero/stage_1_and_2.py): `unscale_and_clip_grads` computes
`clip = ((total_norm / self.loss_scale) + 1e-6) / self.clip_grad` with the ZeRO optimizer's own loss scale,
which is 1.0 under torch_autocast (the scaling is done by `torch_autocast_gradscaler`), so it clips the scaled
gradients to norm `clip`; `_optimizer_step` then calls `torch_autocast_gradscaler.step(optimizer)`, which
unscales them a second time. `engine.get_global_grad_norm()` reports the scaled norm. ZeRO-0 is correct
(engine.py `_take_model_step` unscales before `clip_fp32_gradients`). A fix: divide by the GradScaler's scale
(`self.torch_autocast_gradscaler.get_scale()` or its `_scale` tensor) where `self.loss_scale` is used when
`torch_autocast_gradscaler` is set, or unscale with the GradScaler before computing the norm.

The applied gradient is read from AdamW's first moment after one step: exp_avg = (1 - beta1) * g.
Printed on CPU (gloo), 2026-11-30:

    | ZeRO stage | norm of the gradient AdamW applied | engine.get_global_grad_norm() |
    | 0 | 0.05 (expected 0.05) | nan |
    | 1 | 7.63e-07 (expected 0.05) | 7.646e+04 |      <- 0.05 / 65536, and the scaled norm reported
    | 2 | 7.63e-07 (expected 0.05) | 7.646e+04 |
"""
import os

import deepspeed
import torch
import torch.distributed as dist

CLIP = 0.05


def applied_grad_norm(stage: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": CLIP,
              "zero_optimization": {"stage": stage}, "torch_autocast": {"enabled": True, "dtype": "torch.float16"}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    x, y = torch.randn(8, 16), torch.randint(0, 10, (8,))
    x = x.to(engine.device)
    loss = torch.nn.functional.cross_entropy(engine(x).float(), y.to(engine.device))
    engine.backward(loss)
    engine.step()
    moments = [s["exp_avg"].float().flatten() for s in opt.state.values()]
    applied = float(torch.cat(moments).norm()) / (1 - 0.9) if moments else float("nan")
    return applied, float(engine.get_global_grad_norm() or float("nan"))


def main():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed("nccl" if torch.cuda.is_available() else "gloo")
    print(f"gradient_clipping={CLIP}, torch_autocast fp16; the raw gradient norm is far above the clip\n")
    print("| ZeRO stage | norm of the gradient AdamW applied | engine.get_global_grad_norm() |")
    print("|---|---|---|")
    for stage in (0, 1, 2):
        applied, reported = applied_grad_norm(stage)
        print(f"| {stage} | {applied:.3g} (expected {CLIP}) | {reported:.4g} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
