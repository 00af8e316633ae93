"""`--precision`: what each label means (one PrecisionSpec per label, the only place that says it), whether the
machine can run it, and a run-time check that what runs is what the label says.

  fp32  fp32 weights and math; TF32 off for matmul and cuDNN (FlagPerf's "fp32" rows really ran AMP)
  tf32  fp32 weights; TF32 tensor-core math for matmul and cuDNN
  amp   fp32 weights, fp16 autocast (DeepSpeed `torch_autocast`), dynamic loss scaling (optim.LossScaler)
  fp16  DeepSpeed fp16: fp16 weights, fp32 master copy, dynamic loss scale (FlagPerf's `fp16`)
  bf16  fp32 weights, bf16 autocast (DeepSpeed `torch_autocast`): a plain PyTorch bf16 step. DeepSpeed's bf16
        weights ran a per-tensor optimizer at ZeRO-0 (~160 host syncs a step on ViT-B/16) and summed
        accumulated gradients in bf16 unless told otherwise; autocast keeps fp32 gradients everywhere.

The DeepSpeed adapters at the end (loss scale, what is in effect) and those in optim.py (skipped steps, the
scaler and all-reduce wiring) are the only code that touches DeepSpeed engine attributes outside its documented
API; tests/unit/test_precision.py builds real engines and fails when a DeepSpeed upgrade moves one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitbench.errors import UserError
from vitbench.optim import installed_scaler

# fp16 dynamic loss scaling as FlagPerf's fp16 rows (DeepSpeed's defaults): a user's config may set each.
FP16_SCALING = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                "min_loss_scale": 1}


class PrecisionError(UserError):
    pass


@dataclass(frozen=True)
class PrecisionSpec:
    label: str
    param_dtype: torch.dtype  # the weights, and so the images fed to the model
    compute_dtype: torch.dtype  # the forward pass (the logits' dtype)
    autocast: bool  # fp32 weights, torch autocast to compute_dtype
    loss_scaler: str | None  # "deepspeed" (its fp16 optimizer), "vitbench" (optim.LossScaler, amp) or None
    tf32: bool
    peak_class: str  # the datasheet column MFU divides by

    @property
    def half_weights(self) -> bool:
        """16-bit weights (fp16): gradients of several micro-batches must be summed in fp32."""
        return self.param_dtype != torch.float32

    @property
    def deepspeed_clips(self) -> bool:
        """DeepSpeed's fp16 optimizers scale the loss and clip against that same scale (correctly); every
        other precision is unscaled, clipped and checked by optim.RecipeAdamW, with DeepSpeed's clipping off."""
        return self.loss_scaler == "deepspeed"

    @property
    def input_dtype(self) -> torch.dtype:
        return self.param_dtype  # autocast casts fp32 inputs itself

    def deepspeed_sections(self) -> dict:
        """The DeepSpeed config sections that select this precision (the others off)."""
        return {
            "fp16": {"enabled": self.label == "fp16", **FP16_SCALING},
            "bf16": {"enabled": self.param_dtype == torch.bfloat16},  # DeepSpeed's bf16 weights: no label now
            "torch_autocast": {"enabled": self.autocast, "dtype": str(self.compute_dtype)},
        }

    def check_supported(self, machine) -> None:
        """Refuse, before any heavy work, a precision MACHINE (runinfo.MachineFacts) cannot run."""
        where = f"this run's device is '{machine.device_name}'"
        if self.tf32 and not (machine.device_type == "cuda" and (machine.capability or (0, 0)) >= (8, 0)):
            raise PrecisionError(f"--precision {self.label} needs an NVIDIA GPU with TF32 (Ampere or newer); {where}")
        if self.autocast and not machine.autocast:
            raise PrecisionError(f"--precision {self.label} needs torch autocast on '{machine.device_type}', which "
                                 "this PyTorch lacks")
        if self.param_dtype == torch.float16 and not machine.fp16:
            raise PrecisionError(f"--precision {self.label} needs fp16 weights and optimizer support, which "
                                 f"DeepSpeed's '{machine.device_type}' accelerator does not report; use fp32, amp or "
                                 "bf16 here")
        if self.compute_dtype == torch.bfloat16 and not machine.bf16:
            raise PrecisionError(f"--precision {self.label} is not supported on DeepSpeed's "
                                 f"'{machine.device_type}' accelerator")

    def verify(self, effect: dict) -> None:
        """Raise if what is in effect (`in_effect`) is not what the label promises."""
        problems = []
        if effect["param_dtype"] != str(self.param_dtype):
            problems.append(f"parameters are {effect['param_dtype']}")
        if effect["logits_dtype"] is not None and effect["logits_dtype"] != str(self.compute_dtype):
            problems.append(f"the forward pass computes in {effect['logits_dtype']}")
        tf32_on = [effect["tf32_matmul"], effect["tf32_cudnn"]]
        if not self.tf32 and any(tf32_on):
            problems.append("TF32 is on")
        if self.tf32 and not all(tf32_on):
            problems.append("TF32 is off")
        if self.loss_scaler and effect["loss_scaler"] is None:
            problems.append("there is no loss scaler")
        if problems:
            raise PrecisionError(f"--precision {self.label} is not what runs: {'; '.join(problems)}")

    def to_json(self) -> dict:
        return {"label": self.label, "param_dtype": str(self.param_dtype), "compute_dtype": str(self.compute_dtype),
                "autocast": self.autocast, "loss_scaler": self.loss_scaler, "tf32": self.tf32,
                "peak_class": self.peak_class}


_F32, _F16, _BF16 = torch.float32, torch.float16, torch.bfloat16
SPECS = {s.label: s for s in [
    PrecisionSpec("fp32", _F32, _F32, autocast=False, loss_scaler=None, tf32=False, peak_class="fp32"),
    PrecisionSpec("tf32", _F32, _F32, autocast=False, loss_scaler=None, tf32=True, peak_class="tf32"),
    PrecisionSpec("amp", _F32, _F16, autocast=True, loss_scaler="vitbench", tf32=False, peak_class="16bit"),
    PrecisionSpec("fp16", _F16, _F16, autocast=False, loss_scaler="deepspeed", tf32=False, peak_class="16bit"),
    PrecisionSpec("bf16", _F32, _BF16, autocast=True, loss_scaler=None, tf32=False, peak_class="16bit"),
]}
PRECISIONS = tuple(SPECS)  # the --precision choices, in the order tables show them


def set_tf32(enabled: bool) -> None:
    mode = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode
    torch.backends.cudnn.rnn.fp32_precision = mode


# ---- DeepSpeed adapters ---------------------------------------------------------------------------------
def loss_scale(engine) -> float | None:
    """The loss scale in effect (a read back: log rows only): ours under amp, DeepSpeed's fp16 optimizer's."""
    scaler = installed_scaler(engine)
    if scaler is not None:
        return scaler.get_scale()
    return float(engine.optimizer.loss_scale) if engine.fp16_enabled() else None


def in_effect(engine, logits_dtype: torch.dtype | None = None) -> dict:
    """What the run actually uses, read back from DeepSpeed and PyTorch."""
    scaler = None
    if engine.fp16_enabled():
        scaler = "deepspeed dynamic" if engine.dynamic_loss_scale() else "deepspeed static"
    elif installed_scaler(engine) is not None:
        scaler = "vitbench.optim.LossScaler (dynamic, global)"
    return {
        "param_dtype": str(next(engine.module.parameters()).dtype),
        "autocast_dtype": str(engine.torch_autocast_dtype()) if engine.torch_autocast_enabled() else None,
        "logits_dtype": str(logits_dtype) if logits_dtype is not None else None,
        "matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision,
        "cudnn_conv_fp32_precision": torch.backends.cudnn.conv.fp32_precision,
        "tf32_matmul": torch.backends.cuda.matmul.fp32_precision == "tf32",
        "tf32_cudnn": torch.backends.cudnn.conv.fp32_precision == "tf32",
        "loss_scaler": scaler,
        "gradient_clipping": "deepspeed" if engine.gradient_clipping() else "vitbench.optim.RecipeAdamW",
        "grad_accum_dtype": str(engine.get_data_types()[1]),  # what micro-batch gradients are summed in
        "deepspeed_optimizer": type(engine.optimizer).__name__,  # which of DeepSpeed's precision wrappers ran
    }
