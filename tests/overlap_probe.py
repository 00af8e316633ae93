"""Does DeepSpeed start reducing gradients while backward is still running? Run under `accelerate launch` (CPU
ranks, gloo) by tests/integration/test_overlap.py: for each DeepSpeed config given, one backward of a ViT with more
parameters than a reduce bucket, counting the gradient reductions that begin before the first transformer
block's gradients exist (backward runs from the head down; block 0 is among the last). Prints one JSON line
from rank 0: {config: reductions before block 0's gradients}.

    accelerate launch --config_file accelerate_configs/cpu_1x2.yaml tests/overlap_probe.py ds_configs/zero2.json
    ... ds_configs/zero2.json:reduce_bucket_size=5e8     (the same config with a bucket size changed)
"""

import json
import sys
import time
from pathlib import Path

import deepspeed
import timm
import torch
from deepspeed import comm

from vitbench import dsconfig, precision

REDUCTIONS = ("all_reduce", "reduce", "reduce_scatter_fn", "reduce_scatter_tensor", "reduce_scatter",
              "all_reduce_coalesced", "reduce_scatter_coalesced")


def record_reductions(calls: list) -> None:
    """Time-stamp every gradient-sized reduction DeepSpeed's ZeRO code makes (`deepspeed.comm.X` is looked up at
    each call); one-element tensors (overflow flags, norms) are not gradients."""
    for name in REDUCTIONS:
        original = getattr(comm, name, None)
        if original is None:
            continue

        def wrapped(*args, _original=original, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            if any(t.numel() > 1000 for t in tensors):
                calls.append(time.perf_counter())
            return _original(*args, **kwargs)

        setattr(comm, name, wrapped)


def probe(spec: str, world_size: int) -> int:
    path, _, override = spec.partition(":")
    cfg = dsconfig.build(Path(path), micro_batch=2, grad_accum=1, world_size=world_size, clip_grad=1.0,
                         precision=precision.SPECS["fp32"], zero_stage=None)
    if override:
        key, value = override.split("=")
        cfg["zero_optimization"][key] = float(value)
    torch.manual_seed(0)
    # 4 ViT-B blocks: ~28M parameters, several buckets of 1e7 elements; 32 px keeps the step cheap on a CPU
    model = timm.create_model("vit_base_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=10)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)
    block0 = []
    for p in engine.module.blocks[0].parameters():
        p.register_post_accumulate_grad_hook(lambda _p: block0.append(time.perf_counter()))
    calls = []
    record_reductions(calls)
    loss = engine(torch.randn(2, 3, 32, 32)).float().mean()
    engine.backward(loss)
    engine.step()
    assert block0, "block 0's gradients were never accumulated"
    return sum(t < min(block0) for t in calls)


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    world = comm.get_world_size()
    originals = {name: getattr(comm, name) for name in REDUCTIONS if hasattr(comm, name)}
    out = {}
    for spec in sys.argv[1:]:
        out[spec] = probe(spec, world)
        for name, fn in originals.items():  # unwrap for the next config
            setattr(comm, name, fn)
    if comm.get_rank() == 0:
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
