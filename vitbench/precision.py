"""`--precision`: what each label means, how it is switched on, and a run-time check that it really is.

  fp32  fp32 weights and math; TF32 off for matmul and cuDNN (FlagPerf's "fp32" rows really ran AMP)
  tf32  fp32 weights; TF32 tensor-core math for matmul and cuDNN
  amp   fp32 weights, fp16 autocast, dynamic loss scaling (DeepSpeed `torch_autocast` + GradScaler)
  fp16  DeepSpeed fp16: fp16 weights, fp32 master copy, dynamic loss scale (FlagPerf's `fp16`)
  bf16  DeepSpeed bf16: bf16 weights, fp32 master copy
"""

from __future__ import annotations

import torch

PRECISIONS = ("fp32", "tf32", "amp", "fp16", "bf16")
_PARAM_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "amp": torch.float32, "fp16": torch.float16,
                "bf16": torch.bfloat16}
_COMPUTE_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "amp": torch.float16, "fp16": torch.float16,
                  "bf16": torch.bfloat16}


class PrecisionError(Exception):
    pass


def input_dtype(precision: str) -> torch.dtype:
    """Dtype the images must have: the weights' dtype (autocast casts fp32 inputs itself)."""
    return _PARAM_DTYPE[precision]


def deepspeed_sections(precision: str) -> dict:
    """The DeepSpeed config sections that select the precision (all other precision keys off)."""
    return {
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": precision == "bf16"},
        "torch_autocast": {"enabled": precision == "amp", "dtype": "torch.float16"},
    }


def check_supported(precision: str) -> None:
    """Refuse, before any heavy work, a precision the device cannot run."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    name = acc.device_name()
    if precision == "tf32":
        if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
            raise PrecisionError("--precision tf32 needs an NVIDIA GPU with TF32 (Ampere or newer); "
                                 f"this run's device is '{name}'")
    elif precision == "amp" and not torch.amp.is_autocast_available(name):
        raise PrecisionError(f"--precision amp needs torch autocast on '{name}', which this PyTorch lacks")
    elif precision == "fp16" and not acc.is_fp16_supported():
        raise PrecisionError("--precision fp16 needs fp16 weights and optimizer support, which DeepSpeed's "
                             f"'{name}' accelerator does not report; use fp32, amp or bf16 here")
    elif precision == "bf16" and not acc.is_bf16_supported():
        raise PrecisionError(f"--precision bf16 is not supported on DeepSpeed's '{name}' accelerator")


def set_tf32(enabled: bool) -> None:
    mode = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode
    torch.backends.cudnn.rnn.fp32_precision = mode


def in_effect(engine, logits_dtype: torch.dtype | None = None) -> dict:
    """What the run actually uses, read back from DeepSpeed and PyTorch."""
    scaler = None
    if engine.fp16_enabled():
        scaler = "deepspeed dynamic" if engine.dynamic_loss_scale() else "deepspeed static"
    elif engine.torch_autocast_enabled() and engine.torch_autocast_dtype() == torch.float16:
        scaler = "torch.amp.GradScaler (dynamic)"
    return {
        "param_dtype": str(next(engine.module.parameters()).dtype),
        "autocast_dtype": str(engine.torch_autocast_dtype()) if engine.torch_autocast_enabled() else None,
        "logits_dtype": str(logits_dtype) if logits_dtype is not None else None,
        "matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision,
        "cudnn_conv_fp32_precision": torch.backends.cudnn.conv.fp32_precision,
        "tf32_matmul": torch.backends.cuda.matmul.fp32_precision == "tf32",
        "tf32_cudnn": torch.backends.cudnn.conv.fp32_precision == "tf32",
        "loss_scaler": scaler,
    }


def verify(precision: str, effect: dict) -> None:
    """Raise if what is in effect is not what the label promises."""
    problems = []
    if effect["param_dtype"] != str(_PARAM_DTYPE[precision]):
        problems.append(f"parameters are {effect['param_dtype']}")
    if effect["logits_dtype"] is not None and effect["logits_dtype"] != str(_COMPUTE_DTYPE[precision]):
        problems.append(f"the forward pass computes in {effect['logits_dtype']}")
    if precision == "fp32" and (effect["tf32_matmul"] or effect["tf32_cudnn"]):
        problems.append("TF32 is on")
    if precision == "tf32" and not (effect["tf32_matmul"] and effect["tf32_cudnn"]):
        problems.append("TF32 is off")
    if precision in ("amp", "fp16") and effect["loss_scaler"] is None:
        problems.append("there is no loss scaler")
    if problems:
        raise PrecisionError(f"--precision {precision} is not what runs: {'; '.join(problems)}")
