"""The DeepSpeed config a run uses: a JSON file (ours in ds_configs/ or any user's) with the trainer's
flags written in, so users never keep batch, accumulation, clipping or precision in two places."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vitbench.errors import UserError

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


class ConfigError(UserError):
    pass


def config_path(flag: str | None, environ=os.environ) -> Path:
    """--deepspeed-config, else the one `accelerate launch` was given (its YAML), else ZeRO-1."""
    return Path(flag or environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or DS_CONFIG_DIR / "zero1.json")


def _merge_section(path: Path, key: str, theirs, wanted: dict, label: str) -> dict:
    """One precision section: what selects the precision ("enabled", the autocast dtype) is ours, and a user
    value that contradicts it is refused; the user's other settings (e.g. fp16's `initial_scale_power`,
    `loss_scale_window`) are kept, ours only fill in what the user left out or set to "auto"."""
    theirs = {k: v for k, v in (theirs or {}).items() if v != "auto"} if isinstance(theirs, dict) else {}
    if "enabled" in theirs:
        theirs["enabled"] = bool(theirs["enabled"])
    for k in ("enabled", "dtype"):
        if k in theirs and k in wanted and theirs[k] != wanted[k]:
            raise ConfigError(f"{path}: {key}.{k}={theirs[k]} contradicts --precision {label}; "
                              f"remove the key or set it to \"auto\"")
    return {**wanted, **theirs} if wanted["enabled"] else {"enabled": False}


def build(path: Path, *, micro_batch: int, grad_accum: int, world_size: int, clip_grad: float | None,
          precision, zero_stage: int | None, throughput_timer: bool = False) -> dict:
    """The config at PATH with the flags written in; PRECISION is a precision.PrecisionSpec."""
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: DeepSpeed config not found") from None
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if "optimizer" in cfg or "scheduler" in cfg:
        raise ConfigError(f"{path}: has an 'optimizer' or 'scheduler' section; train_vit.py owns both "
                          "(--lr, --weight-decay, --epochs, --warmup-epochs): remove them")
    ours = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": clip_grad or 0.0,
    }
    for key, value in ours.items():
        if key in cfg and cfg[key] != "auto" and cfg[key] != value:
            raise ConfigError(f"{path}: {key}={cfg[key]} contradicts the flags, which give {value}; "
                              "remove the key or set it to \"auto\"")
    for key, wanted in precision.deepspeed_sections().items():
        cfg[key] = _merge_section(path, key, cfg.get(key), wanted, precision.label)
    if precision.half_weights and grad_accum > 1:
        # DeepSpeed (>= 0.17.6) sums micro-batch gradients in the weights' dtype unless told otherwise.
        types = cfg.setdefault("data_types", {})
        theirs = types.get("grad_accum_dtype", "auto")
        if theirs not in ("auto", "fp32"):
            raise ConfigError(f"{path}: data_types.grad_accum_dtype={theirs} would sum the {precision.label} "
                              f"gradients of {grad_accum} micro-batches in {theirs}; remove it (fp32 is used)")
        types["grad_accum_dtype"] = "fp32"
    cfg.update(ours)
    zero = cfg.setdefault("zero_optimization", {})
    if zero_stage is not None:
        zero["stage"] = zero_stage
    zero.setdefault("stage", 0)
    # DeepSpeed's throughput timer synchronizes the device every step; our profiler measures instead. It is
    # on only when asked for, as an independent second opinion on p_core (benchmarks).
    cfg["timers"] = {"throughput": {"enabled": throughput_timer, "synchronized": throughput_timer}}
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg
