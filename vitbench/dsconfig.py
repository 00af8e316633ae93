"""The DeepSpeed config a run uses: a JSON file (ours in ds_configs/ or any user's) with the trainer's
flags written in, so users never keep batch, accumulation, clipping or precision in two places."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vitbench.precision import deepspeed_sections

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


class ConfigError(Exception):
    pass


def config_path(flag: str | None) -> Path:
    """--deepspeed-config, else the one `accelerate launch` was given (its YAML), else ZeRO-1."""
    return Path(flag or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or DS_CONFIG_DIR / "zero1.json")


def _enabled(section) -> bool | None:
    if not isinstance(section, dict) or section.get("enabled", False) == "auto":
        return None
    return bool(section.get("enabled", False))


def build(path: Path, *, micro_batch: int, grad_accum: int, world_size: int, clip_grad: float | None,
          precision: str, zero_stage: int | None, throughput_timer: bool = False) -> dict:
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
    sections = deepspeed_sections(precision)
    for key, wanted in sections.items():
        theirs = _enabled(cfg.get(key))
        if theirs is not None and theirs != wanted["enabled"]:
            raise ConfigError(f"{path}: {key}.enabled={theirs} contradicts --precision {precision}; "
                              "remove the section or set enabled to \"auto\"")
    for key, wanted in sections.items():
        cfg[key] = {**{k: v for k, v in cfg.get(key, {}).items() if v != "auto"}, **wanted} \
            if wanted["enabled"] else {"enabled": False}
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
