"""The divergence guard (vitbench/guard.py): a loss scaler's skips are excused until they go on, a non-finite
loss counts, and without a scaler a skipped step is a bad one."""

import pytest
import torch

from vitbench.guard import DivergedError, DivergenceGuard


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
