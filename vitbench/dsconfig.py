"""The DeepSpeed config a run uses: a JSON file (ours in ds_configs/ or any user's) with the trainer's
flags written in, so users never keep batch, accumulation, clipping or precision in two places."""

from __future__ import annotations

import collections.abc
import difflib
import os
from pathlib import Path

from vitbench.errors import UserError
from vitbench.files import loads

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


class ConfigError(UserError):
    pass


def config_path(flag: str | None, environ=os.environ) -> Path:
    """--deepspeed-config, else the one `accelerate launch` was given (its YAML), else ZeRO-1. A relative path is
    the working directory's, else the repository's (our accelerate configs name `ds_configs/...`, so a launch
    from another directory finds them)."""
    path = Path(flag or environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or DS_CONFIG_DIR / "zero1.json")
    if not path.is_absolute() and not path.exists() and (DS_CONFIG_DIR.parent / path).exists():
        return DS_CONFIG_DIR.parent / path
    return path


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


def _read(path: Path) -> dict:
    try:
        cfg = loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: DeepSpeed config not found") from None
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return cfg


def build(path: Path, *, micro_batch: int, grad_accum: int, world_size: int, clip_grad: float | None,
          precision, zero_stage: int | None, throughput_timer: bool = False, override: dict | None = None) -> dict:
    """The config at PATH with the flags written in; PRECISION is a precision.PrecisionSpec.
    Clipping is DeepSpeed's only under fp16 weights (its fp16 optimizers clip against their own loss scale);
    otherwise optim.RecipeAdamW clips and DeepSpeed's clipping and ZeRO norm (host syncs, see optim.py) are off.
    OVERRIDE: a vendor profile's communication settings (vitbench.vendor checked them), written over the file's."""
    cfg = _read(path)
    for key, value in (override or {}).items():
        cfg[key] = {**(cfg.get(key) or {}), **value} if isinstance(value, dict) else value
    if "optimizer" in cfg or "scheduler" in cfg:
        raise ConfigError(f"{path}: has an 'optimizer' or 'scheduler' section; train_vit.py owns both "
                          "(--lr, --weight-decay, --epochs, --warmup-epochs): remove them")
    ours = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": clip_grad or 0.0,  # compared with the user's file; written below
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
    validate(path, cfg)
    if not precision.deepspeed_clips:
        cfg["gradient_clipping"] = 0.0
    zero = cfg.setdefault("zero_optimization", {})
    if zero_stage is not None:
        zero["stage"] = zero_stage
    zero.setdefault("stage", 0)
    if world_size == 1 and zero["stage"] > 0:  # nothing to overlap; DeepSpeed syncs the device after each backward
        zero["overlap_comm"] = False
    if zero["stage"] > 0:  # optim.RecipeAdamW is torch's fused AdamW with the recipe's clipping: not on its list
        cfg["zero_allow_untested_optimizer"] = True
    if zero["stage"] in (1, 2) and not precision.deepspeed_clips:
        zero["compute_grad_norm"] = False  # RecipeAdamW computes the norm; DeepSpeed's reads values back
    # DeepSpeed's throughput timer synchronizes the device every step; our profiler measures instead. It is
    # on only when asked for, as an independent second opinion on p_core (benchmarks).
    cfg["timers"] = {"throughput": {"enabled": throughput_timer, "synchronized": throughput_timer}}
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def validate(path: Path, cfg: dict) -> None:
    """CFG checked by DeepSpeed's own config model (its pydantic sections refuse unknown keys, wrong types and
    ZeRO stages outside 0-3), and every top-level key one that DeepSpeed's parser reads (it ignores the rest
    silently: a misspelt `gradient_acumulation_steps` would change nothing). One line naming the file and key."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    read = set()

    class Keys(collections.abc.KeysView):
        def __contains__(self, key):
            read.add(key)
            return super().__contains__(key)

    class Recorded(dict):  # records each top-level key DeepSpeed's parser asks for
        def get(self, key, *default):
            read.add(key)
            return super().get(key, *default)

        def __contains__(self, key):
            read.add(key)
            return super().__contains__(key)

        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)

        def keys(self):
            return Keys(self)

    # accelerate fills the remaining "auto" values at prepare(); the batch total is checked against a world size
    # DeepSpeed cannot know before the process group exists (ours wrote it consistently above)
    probe = _without_auto({k: v for k, v in cfg.items() if k != "train_batch_size"})
    try:
        DeepSpeedConfig(Recorded(probe))
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(part) for part in err["loc"])
        section = next((name for name, v in cfg.items() if isinstance(v, dict) and err["loc"][0] in v), None)
        what = "unknown key" if err["type"] == "extra_forbidden" else \
            f"ZeRO has stages 0, 1, 2 and 3, not {err['input']!r}" if key == "stage" else err["msg"]
        raise ConfigError(f"{path}: {section + '.' if section else ''}{key}: {what} (DeepSpeed {deepspeed_version()}'s "
                          f"{e.title})") from None
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{path}: DeepSpeed refuses this config: {type(e).__name__}: {e}") from None
    for key in sorted(set(cfg) - read):
        close = difflib.get_close_matches(key, sorted(read), n=1)
        raise ConfigError(f"{path}: unknown DeepSpeed key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else
                          f"; DeepSpeed {deepspeed_version()} reads none of that name"))


def _without_auto(value):
    if isinstance(value, dict):
        return {k: _without_auto(v) for k, v in value.items() if v != "auto"}
    return value


def deepspeed_version() -> str:
    from importlib.metadata import version

    return version("deepspeed")


# The fp16 keys torch's GradScaler rule has a counterpart for, with their ranges; under --precision amp they set
# optim.LossScaler's initial scale (2**power) and growth interval.
AMP_SCALING_KEYS = {"initial_scale_power": (0, 64), "loss_scale_window": (1, 10**9)}


def amp_loss_scaling(path: Path) -> dict:
    """--precision amp: the user's `fp16.initial_scale_power` / `fp16.loss_scale_window` become the loss
    scaler's initial scale and growth interval; an fp16 key with no counterpart in that rule is refused."""
    section = _read(path).get("fp16")
    scaling = {"init_scale": 2.0**16, "growth_interval": 2000}  # GradScaler's defaults
    for key, value in section.items() if isinstance(section, dict) else ():
        if key == "enabled" or value == "auto" or (key == "loss_scale" and value == 0):  # 0: dynamic, as ours
            continue
        if key not in AMP_SCALING_KEYS:
            raise ConfigError(f"{path}: fp16.{key} has no counterpart under --precision amp (dynamic scaling by "
                              "torch's GradScaler rule, set by fp16.initial_scale_power and fp16.loss_scale_window); "
                              "remove it")
        low, high = AMP_SCALING_KEYS[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
            raise ConfigError(f"{path}: fp16.{key}={value!r} must be an integer from {low} to {high}")
        scaling["init_scale" if key == "initial_scale_power" else "growth_interval"] = \
            2.0**value if key == "initial_scale_power" else value
    return scaling
