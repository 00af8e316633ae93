"""The recipe's optimizer step (vitbench/optim.py) on real DeepSpeed engines, one rank in-process: what every
precision x ZeRO stage x accumulation applies equals a plain PyTorch step, a steady step reads nothing back, and
the loss scaler follows GradScaler's rule. Two ranks: tests/integration/test_step_two_ranks.py."""

import math

import pytest
import torch

from vitbench import dsconfig, optim, precision
from vitbench.guard import DivergenceGuard
from vitbench.testing.readbacks import CountReadbacks  # the benchmark's read-back counter, the same one

import step_numerics as sn
from conftest import command


@pytest.mark.parametrize("label, stage, accum", sn.CASES)
def test_one_rank_applies_what_a_plain_step_applies(one_rank_group, label, stage, accum):
    if not sn.supported(label):
        pytest.skip(f"--precision {label} is not supported on this machine's CPU")
    sn.assert_plain_update(sn.compare(label, stage, accum), label, f"{label} ZeRO-{stage} accum {accum}")


# ---- no host read-backs in a steady step ----------------------------------------------------------------
@pytest.mark.parametrize("label", ["fp32", "amp", "bf16"])
def test_a_steady_step_reads_nothing_back(one_rank_group, label):
    """The trainer's step (train_vit.train_step, then what Run.step_done does per step) on the trainer's
    wiring: 0 read-backs at ZeRO-0, at most 1 (DeepSpeed's overflow decision) at ZeRO-1/2."""
    import deepspeed
    import timm
    from timm.loss import LabelSmoothingCrossEntropy

    train_vit = command("train_vit")

    spec = precision.SPECS[label]
    for stage in (0, 1, 2):
        cfg = dsconfig.build(dsconfig.DS_CONFIG_DIR / "zero1.json", micro_batch=4, grad_accum=2, world_size=1,
                             clip_grad=1.0, precision=spec, zero_stage=stage)
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
        opt = optim.make_optimizer(model.parameters(), precision=spec, lr=1e-3, weight_decay=0.3, clip_grad=1.0,
                                  loss_scaling={"init_scale": 2.0**16} if spec.loss_scaler else None, device="cpu")
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        optim.attach(engine, opt, world_size=1, zero_stage=stage)
        outcome, guard = optim.StepOutcome(engine, opt), DivergenceGuard("cpu", loss_scaler=bool(spec.loss_scaler))
        loss_fn, loss_sum = LabelSmoothingCrossEntropy(0.11), torch.zeros(())
        micro = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
        counts = []
        for n in range(1, 5):  # warm-up steps first: lazy state, first-call paths
            with CountReadbacks() as c:
                _, nonfinite = train_vit.train_step(engine, micro, loss_fn, loss_sum)
                guard.step_done(n, nonfinite, outcome.skipped())
            counts.append(c.calls)
        assert engine.global_steps == 4
        steady = counts[-1]
        assert len(steady) <= (0 if stage == 0 else 1), f"{label} ZeRO-{stage}: read-backs {steady}"


# ---- the loss scaler ------------------------------------------------------------------------------------
def test_loss_scaler_follows_gradscalers_rule():
    """Same sequence of found-inf verdicts -> the same scales as torch.amp.GradScaler (growth, back-off)."""
    ours = optim.LossScaler("cpu", init_scale=2.0**4, growth_interval=3)
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=3)
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.0)
    for found_inf in [0, 0, 0, 1, 0, 1, 1, 0, 0, 0, 0]:
        theirs.scale(torch.ones(()))  # its scale tensor is made lazily
        p.grad = torch.full((2,), math.inf if found_inf else 1.0)
        theirs.step(opt)
        theirs.update()
        ours.update_after(torch.tensor(bool(found_inf)))
        assert ours.get_scale() == theirs.get_scale()
    restored = optim.LossScaler("cpu")
    restored.load_state_dict(ours.state_dict())
    assert restored.state_dict() == ours.state_dict()
