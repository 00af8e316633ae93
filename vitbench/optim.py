"""The optimizer step of the recipe, done on the device: the one place that unscales, clips and skips.

DeepSpeed keeps what only it does: the ZeRO partitions, the gradient reduction across ranks, autocast and
its 16-bit communication. At every accumulation boundary it calls our optimizer with the reduced fp32
gradients (at ZeRO 1-3: this rank's flat partition). `RecipeAdamW` then applies, inside torch's fused AdamW
kernel, exactly what a plain PyTorch step applies:

    g = grad / loss_scale;  g *= min(1, clip / (||g||_global + 1e-6));  skip the step if ||g|| is not finite

The division is the fused kernel's `grad_scale` and the skip its `found_inf` (the protocol torch's GradScaler
uses with fused optimizers), so clipping costs one norm pass and no extra pass over the gradients, and nothing
is read back to the host: a GPU never waits on the CPU inside a step.

Why not DeepSpeed's own clipping (deepspeed 0.19.8):
- amp at ZeRO 1/2 applies gradients of norm clip/scale: runtime/zero/stage_1_and_2.py `unscale_and_clip_grads`
  (:3193-3213) divides the norm by the ZeRO optimizer's own loss scale (1.0 under torch_autocast), clips the
  still-scaled gradients to `clip`, then `_optimizer_step` (:2976-2978) has the GradScaler unscale them again
  (docs/deepspeed-amp-clip.py reproduces it for DeepSpeed's maintainers).
- Every clipping path reads values back: runtime/utils.py `clip_grad_norm_` (ZeRO-0), and at ZeRO 1/2 the
  norm's validity checks (`is_invalid_grad_norm`, stage_1_and_2.py:3043 and :3203) and `get_grad_norm_direct`'s
  masked fill (utils.py:887-888); `zero_optimization.compute_grad_norm: false` turns that norm off.
- The GradScaler DeepSpeed makes at ZeRO 1-3 finds infs in this rank's partition only, so ranks could disagree
  on a skip and their scales drift apart; ours decides from the global norm, identically on every rank.

--precision fp16 (fp16 weights) is the exception: DeepSpeed's fp16 optimizers scale the loss themselves and
clip against that same scale, correctly; there our optimizer only steps.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: clip_coef = max_norm / (total_norm + 1e-6)


class LossScaler:
    """Dynamic loss scaling for --precision amp, by torch.amp.GradScaler's rule (x0.5 after a non-finite step,
    x2 after `growth_interval` finite steps in a row), updated on the device by the optimizer from the global
    gradient norm. DeepSpeed's torch_autocast mode calls it where it would call its own GradScaler
    (`scale`, `step`, `update`); it is saved in checkpoints (`state_dict`)."""

    def __init__(self, device, init_scale: float = 2.0**16, growth_interval: int = 2000):
        self.scale_tensor = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.growth_interval = growth_interval

    def scale(self, loss):
        return loss * self.scale_tensor

    def step(self, optimizer):
        return optimizer.step()  # RecipeAdamW unscales with this scaler and updates it

    def update(self, new_scale=None):
        pass  # done by RecipeAdamW.step, which knows the global verdict

    def update_after(self, found_inf) -> None:
        torch._amp_update_scale_(self.scale_tensor, self.growth_tracker, found_inf.float(), 2.0, 0.5,
                                 self.growth_interval)

    def back_off(self) -> None:
        """After a step DeepSpeed skipped itself (ZeRO-3 checks overflow before calling the optimizer)."""
        self.update_after(torch.ones((), dtype=torch.bool, device=self.scale_tensor.device))

    def get_scale(self) -> float:
        return float(self.scale_tensor)  # a read back: log rows only

    def state_dict(self) -> dict:
        return {"scale": float(self.scale_tensor), "growth_tracker": int(self.growth_tracker)}  # the settings: Plan

    def load_state_dict(self, sd: dict) -> None:
        self.scale_tensor.fill_(sd["scale"])
        self.growth_tracker.fill_(sd["growth_tracker"])


class RecipeAdamW(torch.optim.AdamW):
    """torch's fused AdamW that unscales, clips to the global gradient norm and skips non-finite steps itself,
    on the device (see the module docstring). After each step `grad_norm` (the true, unscaled norm before
    clipping) and `skipped` (a bool) are device tensors; nothing here synchronizes."""

    def __init__(self, params, *, clip_grad: float, scaler: LossScaler | None = None, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        if len(self.param_groups) != 1:
            # DeepSpeed's ZeRO steps one group at a time: the global norm must see every gradient at once.
            raise ValueError("RecipeAdamW takes one parameter group")
        self.clip_grad = clip_grad
        self.scaler = scaler
        self.norm_group = None  # set by `attach` where each rank holds only a slice of the gradient
        self.grad_norm = self.skipped = None

    @torch.no_grad()
    def step(self, closure=None):
        if hasattr(self, "grad_scale"):  # torch's GradScaler protocol: it would unscale a second time
            raise RuntimeError("a torch GradScaler drives RecipeAdamW; optim.attach installs optim.LossScaler instead")
        grads = [p.grad for p in self.param_groups[0]["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)  # clip_grad_norm_'s
        if self.norm_group is not None:  # ZeRO 1-3 across ranks: sum the squares of every rank's slice
            squares = norm.square()
            dist.all_reduce(squares, group=self.norm_group)
            norm = squares.sqrt()
        divisor = torch.ones_like(norm)
        if self.scaler is not None:
            divisor = self.scaler.scale_tensor.clone()
            norm = norm / divisor
        skipped = ~torch.isfinite(norm)
        if self.clip_grad:
            divisor = divisor / torch.clamp(self.clip_grad / (norm + CLIP_EPS), max=1.0)
        self.grad_scale, self.found_inf = divisor, skipped.float()
        try:
            super().step()  # the fused kernel: grad / grad_scale, and no update at all where found_inf
        finally:
            del self.grad_scale, self.found_inf
        if self.scaler is not None:
            self.scaler.update_after(skipped)
        self.grad_norm, self.skipped = norm, skipped


def _not_the_untested_optimizer_warning(record: logging.LogRecord) -> bool:
    return "untested optimizer" not in record.getMessage()


def make_optimizer(params, *, precision, lr: float, weight_decay: float, clip_grad: float,
                   loss_scaling: dict | None, device) -> RecipeAdamW:
    """The recipe's AdamW for PRECISION (a precision.PrecisionSpec); LOSS_SCALING: the Plan's (amp) or None."""
    # ZeRO warns of any optimizer class not on its list; this one is torch's AdamW (config:
    # zero_allow_untested_optimizer), so the warning would only alarm.
    logging.getLogger("DeepSpeed").addFilter(_not_the_untested_optimizer_warning)  # a set: added once
    scaler = LossScaler(device, **loss_scaling) if loss_scaling is not None else None
    return RecipeAdamW(params, lr=lr, weight_decay=weight_decay, scaler=scaler,
                       clip_grad=0.0 if precision.deepspeed_clips else clip_grad)


def attach(engine, optimizer: RecipeAdamW, *, world_size: int, zero_stage: int) -> None:
    """Wire RecipeAdamW into the DeepSpeed ENGINE built around it. The only writes to DeepSpeed attributes
    outside its config; tests/unit/test_optim.py builds real engines, so an upgrade that moves one fails a test."""
    if zero_stage > 0 and world_size > 1:
        optimizer.norm_group = dist.group.WORLD
    if zero_stage == 0 and world_size == 1:
        # engine.py `allreduce_gradients` at one process: a flatten, an all-reduce over nothing and a copy back
        # of every gradient (8 bytes a parameter a step). ZeRO 1-2 reduce into their partitions there: kept.
        engine.enable_backward_allreduce = False
    if zero_stage == 3 and len(engine.optimizer.fp32_partitioned_groups_flat) != 1:
        raise ValueError("zero_optimization.sub_group_size splits the parameters into several optimizer steps; "
                         "remove it (the recipe clips to the norm of all gradients at once)")
    if optimizer.scaler is not None or zero_stage > 0:
        # Set at ZeRO 1-3 even without a scaler: the ZeRO optimizers make a GradScaler whenever any earlier
        # engine in the process enabled fp16 autocast (a module-level flag in deepspeed/runtime/torch_autocast.py).
        holder, attr = _scaler_slot(engine)
        setattr(holder, attr, optimizer.scaler)


# ---- the one adapter of DeepSpeed's GradScaler slot: written by attach, read by installed_scaler --------
def _scaler_slot(engine) -> tuple[object, str]:
    """Where DeepSpeed's torch_autocast mode keeps its GradScaler: on the engine under ZeRO-0, on the ZeRO
    optimizer under ZeRO 1-3."""
    if engine.zero_optimization():
        return engine.optimizer, "torch_autocast_gradscaler"
    return engine, "torch_autocast_z0_gradscaler"


def installed_scaler(engine) -> LossScaler | None:
    """The LossScaler attach installed (amp), or None."""
    holder, attr = _scaler_slot(engine)
    scaler = getattr(holder, attr, None)
    return scaler if isinstance(scaler, LossScaler) else None


class StepOutcome:
    """Did the last optimizer step skip? DeepSpeed decides on the host where it checks overflow itself (its fp16
    optimizers, ZeRO-3: it counts `engine.skipped_steps` and never calls the optimizer), RecipeAdamW on the
    device everywhere else. A skip DeepSpeed decided backs the amp loss scaler off, as a GradScaler would."""

    def __init__(self, engine, optimizer: RecipeAdamW):
        self.engine, self.optimizer = engine, optimizer
        self.deepspeed_skips = int(engine.skipped_steps)

    def skipped(self):
        """A host bool (DeepSpeed skipped) or RecipeAdamW's device bool."""
        now = int(self.engine.skipped_steps)
        if now != self.deepspeed_skips:
            self.deepspeed_skips = now
            if self.optimizer.scaler is not None:
                self.optimizer.scaler.back_off()
            return True
        return self.optimizer.skipped

    def grad_norm(self):
        """The true (unscaled) gradient norm before clipping, as a device tensor (DeepSpeed's under fp16)."""
        if self.engine.fp16_enabled():
            return self.engine.get_global_grad_norm()
        return self.optimizer.grad_norm
