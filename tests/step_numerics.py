"""What the optimizer applies, ours against a plain PyTorch step: one case = a precision x ZeRO stage x
accumulation on the ranks of the current process group. Imported by tests/unit/test_optim.py (one rank, in-process)
and run as a script under `accelerate launch` (two gloo ranks) for the same cases:

    accelerate launch --config_file accelerate_configs/cpu_1x2.yaml tests/step_numerics.py fp32:1:2 amp:2:1 ...

prints one JSON line from rank 0: {"LABEL:STAGE:ACCUM": case result}.

Each case trains STEPS optimizer steps of a small Linear/LayerNorm network on a fixed global batch, the loss
multiplied per step by LOSS_GAIN, with --clip-grad set from the plain step's first raw norm so that step 1 is
not clipped and step 2 is. The applied gradient is read where both steps hand it to torch's fused AdamW kernel
(`torch._fused_adamw_`: the gradients divided by `grad_scale`), so the spy is the same for both.
"""

import json
import math
import sys

import pytest
import torch

from vitbench import dsconfig, optim, precision
from vitbench.runinfo import MachineFacts

STEPS = 3
LOSS_GAIN = (1.0, 10.0, 0.1)  # step 1 under the clip, step 2 over it, step 3 under again
MICRO, IN, OUT = 4, 16, 10
INIT_SCALE = 2.0**8  # amp: no fp16 overflow in this network's gradients at this scale, so clipping is exercised


# ---- the matrix's cases and what "equal" means, shared by the one-rank and two-rank tests ----------------
# Relative tolerance per precision, for norms and for the whole update vector. The plain step and ours differ
# only in summation order, except that DeepSpeed's torch_autocast mode reduces (and, with accumulation at
# ZeRO-1, stages) Linear gradients in the autocast dtype: a rounding at that dtype's unit roundoff.
TOLERANCE = {
    "fp32": 1e-5,  # reduction order only; measured <= 2e-7
    "amp": 2e-3,  # fp16 unit roundoff 2**-11 = 4.9e-4; measured <= 6e-5
    "bf16": 1e-2,  # bf16 unit roundoff 2**-8 = 3.9e-3; measured <= 4.3e-4
}
# amp first: DeepSpeed's autocast flag is module-level, and a later fp32 engine must not pick up its GradScaler.
# Not fp16 (fp16 weights): it keeps DeepSpeed's own fp16 optimizers, scaling and clipping, and no machine this
# project has tested on runs it (no AVX512-FP16 here), so no tolerance for it has been measured; its run is
# checked where supported by tests/integration/test_faults_data_runs.py.
LABELS = ["amp", "fp32", "bf16"]
CASES = [(label, stage, accum) for label in LABELS for stage in (0, 1, 2, 3) for accum in (1, 2)]


def supported(label: str) -> bool:
    try:
        precision.SPECS[label].check_supported(MachineFacts.probe())
        return True
    except precision.PrecisionError:
        return False


def assert_plain_update(case: dict, label: str, where: str) -> None:
    tol = TOLERANCE[label]
    plain, ours = case["plain"], case["ours"]
    raw, clip = plain["raw_norm"], case["clip"]
    # the case exercises both branches of the recipe: step 1 under the clip, step 2 over it
    assert raw[0] < clip < raw[1], f"{where}: the case does not exercise clipping ({raw}, clip {clip})"
    for i, (p, o) in enumerate(zip(plain["applied_norm"], ours["applied_norm"])):
        assert (p is None) == (o is None), f"{where} step {i + 1}: plain skipped {p is None}, ours {o is None}"
        if p is None:
            continue
        assert p == pytest.approx(min(raw[i], clip), rel=tol), f"{where} step {i + 1}: the plain step itself"
        assert o == pytest.approx(p, rel=tol), \
            f"{where} step {i + 1}: ours applied a gradient of norm {o}, the recipe {p} (raw {raw[i]}, clip {clip})"
        assert ours["raw_norm"][i] == pytest.approx(raw[i], rel=tol), f"{where} step {i + 1}: logged grad norm"
    assert case["update_rel_diff"] <= tol, f"{where}: weights after {STEPS} steps differ by {case}"


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, 64), torch.nn.GELU(), torch.nn.LayerNorm(64),
                               torch.nn.Linear(64, OUT))


def batches(world: int, accum: int):
    """The global batch of every step: world x accum micro-batches, the same for ours and the plain step."""
    g = torch.Generator().manual_seed(1)
    return [[(torch.randn(MICRO, IN, generator=g), torch.randint(0, OUT, (MICRO,), generator=g))
             for _ in range(world * accum)] for _ in range(STEPS)]


class AppliedSpy:
    """Records, per call of the fused AdamW kernel, the squared norm of what it applies (grad / grad_scale),
    or None where found_inf makes it skip."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        self.original = torch._fused_adamw_

        def spy(params, grads, *args, grad_scale=None, found_inf=None, **kwargs):
            if found_inf is not None and float(found_inf) != 0:
                self.calls.append(None)
            else:
                sq = sum(float(g.double().square().sum()) for g in grads)
                self.calls.append(sq / (float(grad_scale) ** 2 if grad_scale is not None else 1.0))
            return self.original(params, grads, *args, grad_scale=grad_scale, found_inf=found_inf, **kwargs)
        torch._fused_adamw_ = spy
        return self

    def __exit__(self, *exc):
        torch._fused_adamw_ = self.original


def loss_of(model_out, y, gain):
    return torch.nn.functional.cross_entropy(model_out.float(), y) * gain


def plain(label: str, accum: int, world: int, clip: float) -> dict:
    """The plain PyTorch step (bench/ceiling.py's): autocast, GradScaler for fp16, clip_grad_norm_, fused AdamW."""
    spec = precision.SPECS[label]
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, enabled=spec.compute_dtype == torch.float16)
    raw = []
    with AppliedSpy() as spy:
        for gain, micro in zip(LOSS_GAIN, batches(world, accum)):
            for x, y in micro:
                with torch.autocast("cpu", dtype=spec.compute_dtype, enabled=spec.autocast):
                    out = model(x)
                scaler.scale(loss_of(out, y, gain) / len(micro)).backward()
            scaler.unscale_(opt)
            raw.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip or math.inf)))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
    return {"raw_norm": raw, "applied_norm": [None if c is None else math.sqrt(c) for c in spy.calls],
            "weights": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()}


def first_raw_norm(label: str, accum: int, world: int) -> float:
    return plain(label, accum, world, clip=0.0)["raw_norm"][0]


def ours(label: str, stage: int, accum: int, clip: float) -> dict:
    """The trainer's step: DeepSpeed built from our config and RecipeAdamW attached (train_vit.build_engine's
    wiring), driven like train_vit.train_step. Runs on every rank of the current process group."""
    import deepspeed
    import torch.distributed as dist

    spec = precision.SPECS[label]
    world, rank = dist.get_world_size(), dist.get_rank()
    model = net()
    opt = optim.make_optimizer(model.parameters(), precision=spec, lr=1e-2, weight_decay=0.3, clip_grad=clip,
                              loss_scaling={"init_scale": INIT_SCALE} if spec.loss_scaler == "vitbench" else None,
                              device="cpu")
    cfg = dsconfig.build(dsconfig.DS_CONFIG_DIR / "zero1.json", micro_batch=MICRO, grad_accum=accum,
                         world_size=world, clip_grad=clip, precision=spec, zero_stage=stage)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    optim.attach(engine, opt, world_size=world, zero_stage=stage)
    outcome = optim.StepOutcome(engine, opt)
    norms = []
    with AppliedSpy() as spy:
        for gain, micro in zip(LOSS_GAIN, batches(world, accum)):
            for x, y in micro[rank * accum:(rank + 1) * accum]:  # this rank's share of the global batch
                engine.backward(loss_of(engine(x.to(spec.input_dtype)), y, gain))
                engine.step()
            norms.append(math.nan if outcome.skipped() is True else float(outcome.grad_norm()))
    applied = []
    for c in spy.calls:  # this rank's slice at ZeRO 1-3: the applied norm is the sum over ranks
        t = torch.tensor(-1.0 if c is None else c, dtype=torch.float64)
        if stage > 0:  # ZeRO-0: every rank applies the whole (identical) gradient
            dist.all_reduce(t)
        applied.append(None if c is None else math.sqrt(float(t)))
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        weights = torch.cat([p.detach().float().flatten() for p in engine.module.parameters()]).tolist()
    return {"raw_norm": norms, "applied_norm": applied, "weights": weights}


def compare(label: str, stage: int, accum: int) -> dict:
    """One case on the current process group: ours and the plain step of the same global batches."""
    import torch.distributed as dist

    world = dist.get_world_size()
    clip = 3 * first_raw_norm(label, accum, world)  # step 1 (gain 1) under it, step 2 (gain 10) over it
    reference, result = plain(label, accum, world, clip), ours(label, stage, accum, clip)
    w_ref, w_ours = torch.tensor(reference["weights"]), torch.tensor(result["weights"])
    w_start = torch.cat([p.detach().flatten() for p in net().parameters()])
    update_ref = w_ref - w_start
    return {"clip": clip, "plain": {k: reference[k] for k in ("raw_norm", "applied_norm")},
            "ours": {k: result[k] for k in ("raw_norm", "applied_norm")},
            "update_rel_diff": float((w_ours - w_ref).norm() / update_ref.norm())}


def main(cases: list[str]) -> None:
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed("gloo")
    out = {}
    for case in cases:
        label, stage, accum = case.split(":")
        out[case] = compare(label, int(stage), int(accum))
    if dist.get_rank() == 0:
        print(json.dumps(out), flush=True)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
