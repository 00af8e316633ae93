"""The DeepSpeed step: what every precision x ZeRO stage x accumulation applies equals a plain PyTorch step
(real DeepSpeed engines, one rank in-process and two gloo ranks under `accelerate launch`), a steady step reads
nothing back, the loss scaler follows GradScaler's rule, and the divergence guard's branches."""

import json
import math
import subprocess

import pytest
import torch

from vitbench import dsconfig, optim, precision
from vitbench.guard import DivergedError, DivergenceGuard
from vitbench.runinfo import MachineFacts
from vitbench.testing.readbacks import CountReadbacks  # the benchmark's read-back counter, the same one

import step_numerics as sn
from conftest import BIN, REPO, run_env

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
# checked where supported by tests/test_faults_data.py.
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
    assert case["update_rel_diff"] <= tol, f"{where}: weights after {sn.STEPS} steps differ by {case}"


@pytest.mark.parametrize("label, stage, accum", CASES)
def test_one_rank_applies_what_a_plain_step_applies(one_rank_group, label, stage, accum):
    if not supported(label):
        pytest.skip(f"--precision {label} is not supported on this machine's CPU")
    assert_plain_update(sn.compare(label, stage, accum), label, f"{label} ZeRO-{stage} accum {accum}")


@pytest.mark.slow
def test_two_ranks_apply_what_a_plain_step_applies():
    # accumulation 2 only: micro-batches summed and reduced across ranks in one step (every stage's reduction
    # runs at the boundary either way); accumulation 1 is in the one-rank matrix
    cases = [c for c in CASES if supported(c[0]) and c[2] == 2]
    proc = subprocess.run([str(BIN / "accelerate"), "launch", "--config_file", "accelerate_configs/cpu_1x2.yaml",
                           "tests/step_numerics.py", *(f"{label}:{stage}:{accum}" for label, stage, accum in cases)],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for label, stage, accum in cases:
        assert_plain_update(results[f"{label}:{stage}:{accum}"], label, f"2 ranks {label} ZeRO-{stage} accum {accum}")


# ---- no host read-backs in a steady step ----------------------------------------------------------------
@pytest.mark.parametrize("label", ["fp32", "amp", "bf16"])
def test_a_steady_step_reads_nothing_back(one_rank_group, label):
    """The trainer's step (train_vit.train_step, then what Run.step_done does per step) on the trainer's
    wiring: 0 read-backs at ZeRO-0, at most 1 (DeepSpeed's overflow decision) at ZeRO-1/2."""
    import deepspeed
    import timm
    from timm.loss import LabelSmoothingCrossEntropy

    import train_vit

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


# ---- the loss scaler and the divergence guard -------------------------------------------------------------
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


def test_guard_excuses_a_loss_scalers_skips_until_they_go_on():
    guard = DivergenceGuard("cpu", loss_scaler=True, max_skips_in_a_row=3)
    no, yes = torch.tensor(False), torch.tensor(True)
    for n, skipped in enumerate([yes, yes, no, yes], start=1):  # back-offs, recovered
        guard.step_done(n, yes if n == 1 else no, skipped)  # a non-finite loss in a skipped step is excused
    guard.check()
    for n in range(5, 8):
        guard.step_done(n, no, True)  # DeepSpeed's host decision (ZeRO-3, fp16)
    with pytest.raises(DivergedError, match="skipped 4 steps in a row from step 4"):
        guard.check(loss_scale=lambda: 0.5)


def test_guard_counts_a_non_finite_loss_in_a_streak_not_recovered_from():
    guard = DivergenceGuard("cpu", loss_scaler=True)
    guard.step_done(1, torch.tensor(False), torch.tensor(False))
    guard.step_done(2, torch.tensor(False), torch.tensor(True))
    guard.step_done(3, torch.tensor(True), torch.tensor(True))
    with pytest.raises(DivergedError, match="non-finite loss at step 2"):
        guard.check()


def test_guard_without_a_loss_scaler_calls_a_skipped_step_bad():
    guard = DivergenceGuard("cpu", loss_scaler=False)
    guard.step_done(1, torch.tensor(False), torch.tensor(False))
    guard.check()
    guard.step_done(2, torch.tensor(False), torch.tensor(True))  # non-finite gradients, finite loss
    guard.step_done(3, torch.tensor(True), torch.tensor(False))
    with pytest.raises(DivergedError, match="non-finite loss or gradients at step 2"):
        guard.check(reduce_min=lambda t: t)
