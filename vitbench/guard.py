"""The divergence guard: non-finite losses and skipped optimizer steps, tracked on the device every step and
read back only where the loop already stops to look (log rows, checkpoints, evaluations), so that no
checkpoint, log row or evaluation ever follows a step the run could not recover from.

With a loss scaler (amp, fp16) a skipped step is the scaler backing off, and is excused, unless the skips go
on: more than `max_skips_in_a_row` is divergence, and a non-finite loss in a streak still going when the
guard is checked counts from the streak's first step. Without one (fp32, tf32, bf16) a skipped step means
non-finite gradients, as bad as a non-finite loss. optim.RecipeAdamW never applies such a step.
"""

from __future__ import annotations

import torch

from vitbench.errors import UserError

NO_BAD_STEP = 2**62
# Steps the loss scaler may skip in a row before the run counts as diverged: from 2**16 the scale would be
# below 2**-14 by then, where no healthy fp16 run ever goes.
MAX_SKIPPED_IN_A_ROW = 30


class DivergedError(UserError):
    pass


class DivergenceGuard:
    def __init__(self, device, *, loss_scaler: bool, max_skips_in_a_row: int = MAX_SKIPPED_IN_A_ROW):
        self.loss_scaler, self.max_skips = loss_scaler, max_skips_in_a_row
        zero = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad = torch.full((), NO_BAD_STEP, dtype=torch.long, device=device)
        self.streak, self.streak_start, self.worst, self.worst_start = (zero.clone() for _ in range(4))
        self.streak_nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self._host_bool = {b: torch.full((), b, dtype=torch.bool, device=device) for b in (False, True)}

    def step_done(self, step: int, loss_nonfinite, skipped) -> None:
        """Optimizer step STEP (1-based) ended. LOSS_NONFINITE: a device bool (any micro-batch's loss);
        SKIPPED: a device bool, or a host bool where DeepSpeed decided on the host (its fp16 optimizers)."""
        if isinstance(skipped, bool):
            skipped = self._host_bool[skipped]
        bad = loss_nonfinite & ~skipped if self.loss_scaler else loss_nonfinite | skipped
        self.first_bad = torch.where(bad, torch.clamp(self.first_bad, max=step), self.first_bad)
        self.streak = torch.where(skipped, self.streak + 1, 0)
        self.streak_start = torch.where(skipped & (self.streak == 1), step, self.streak_start)
        self.streak_nonfinite = (self.streak_nonfinite | loss_nonfinite) & skipped
        longer = self.streak > self.worst
        self.worst = torch.where(longer, self.streak, self.worst)
        self.worst_start = torch.where(longer, self.streak_start, self.worst_start)

    def check(self, reduce_min=None, loss_scale=None) -> None:
        """Raise DivergedError if the run cannot go on. REDUCE_MIN(tensor) makes every rank agree (a
        non-finite loss may show on one rank only); one read back."""
        bad = self.first_bad
        if self.loss_scaler:  # skipped steps not recovered from yet: their non-finite losses count now
            bad = torch.where(self.streak_nonfinite, torch.clamp(bad, max=self.streak_start), bad)
        verdict = torch.stack([bad, -self.worst, -self.worst_start])
        if reduce_min is not None:
            verdict = reduce_min(verdict)
        bad, minus_worst, minus_start = verdict.tolist()  # the one read back
        worst, worst_start = -minus_worst, -minus_start
        if worst > self.max_skips:
            scale = f" (loss scale now {loss_scale()})" if loss_scale else ""
            raise DivergedError(f"the optimizer skipped {worst} steps in a row from step {worst_start}, their "
                                f"gradients not finite{scale}: the run diverged; lower --lr or check the data, "
                                "then resume from a checkpoint before that step")
        if bad != NO_BAD_STEP:
            what = "loss" if self.loss_scaler else "loss or gradients"
            raise DivergedError(f"non-finite {what} at step {bad}" + (" (not a step the loss scaler skipped)"
                                                                       if self.loss_scaler else "")
                                + "; no checkpoint was written after it: lower --lr or check the data, then resume "
                                "from the last checkpoint")
