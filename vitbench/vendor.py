"""`--vendor NAME|PATH`: what an accelerator vendor brings, in `vendors/<name>/profile.toml`, and FlagPerf's rule
enforced in one place (its case-adaptation spec): a vendor may change only what is tied to the hardware —
micro-batch size (accumulation is re-derived, the global batch stays), communication, loader kind and workers,
compile and kernel choices, the environment — never the model, the optimizer, the schedule, the augmentation,
the data, the precision label or the target. A profile that touches any of those is refused naming the key and
the file. The profile's overrides are the run's `fix_hp` (FlagPerf's column: "special hyper-parameters needed
to saturate the hardware"), and results.json records the profile, its content and its hash.

profile.toml:
    name = "nvidia"
    description = "..."
    [overrides]           # train_vit.py flags (underscores), the allowed ones only; flags given still win
    batch_size = 256
    [env]                 # set in every rank before the process group exists: NCCL_*, HCCL_*, ... only
    NCCL_IB_HCA = "mlx5"
    [launch]              # accelerate configs per layout, the extra requirements, the DeepSpeed override
    "1x8" = "accelerate/1x8.yaml"
    requirements = "requirements.txt"
    deepspeed = "deepspeed.json"   # merged into the run's DeepSpeed config: communication keys only
    [hardware]            # what a run cannot probe: 机器型号, 多机网络类型、带宽
    machine = "NVIDIA DGX A100 (40G)"
    network = "InfiniBand, 200 Gb/s"
    [software]            # likewise: Docker 版本, 依赖软件版本
    container = "none"
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from vitbench.errors import UserError
from vitbench.files import loads

VENDORS_DIR = Path(__file__).resolve().parent.parent / "vendors"
PROFILE_FILE = "profile.toml"

# The flags a profile may set: tied to the hardware (FlagPerf: distributed communication, batch size and the like).
ALLOWED_OVERRIDES = {
    "batch_size": "micro-batch per device (accumulation re-derived; the global batch is the recipe's)",
    "workers": "loader processes per device", "loader": "wds or dali", "compile": "torch.compile",
    "zero_stage": "ZeRO stage (the same update, other memory and communication)",
    "eval_batch_size": "validation images per forward", "log_interval": "rows between profiler lines",
    "timing_warmup_steps": "steps left out of the steady figures", "peak_tflops": "the device's datasheet peak",
}
# What a profile may never change, by kind, for the refusal's words.
FORBIDDEN_OVERRIDES = {
    "the model": ("model", "img_size", "patch_size", "model_kwargs"),
    "the optimizer": ("lr", "lr_base", "lr_base_size", "weight_decay", "clip_grad"),
    "the schedule": ("epochs", "warmup_epochs", "warmup_lr_factor", "min_lr", "max_steps"),
    "the augmentation": ("aa", "mixup", "cutmix", "smoothing", "aug_repeats"),
    "the data": ("data_dir", "seed"),
    "the global batch": ("global_batch_size",),
    "the precision label": ("precision",),
    "the target": ("target_acc1", "eval_every"),
}
# Environment variables a profile may set: communication libraries, allocators, threading, compilers.
ALLOWED_ENV = re.compile(r"(NCCL|RCCL|GLOO|TORCH_NCCL|HCCL|CNCL|CCL|FI|UCX|NVSHMEM|PT_HPU|HABANA|KMP|MKL|ONEDNN|"
                         r"TORCHINDUCTOR|CUDA_DEVICE_MAX_CONNECTIONS|PYTORCH_(CUDA|HIP|XPU|NPU)_ALLOC_CONF|OMP_NUM_THREADS)"
                         r"(_[A-Z0-9_]+)?")
# DeepSpeed config keys a profile's override may set: communication, buckets and overlap.
ALLOWED_DEEPSPEED = {
    "zero_optimization": {"stage", "overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size",
                          "reduce_scatter", "allgather_partitions", "round_robin_gradients",
                          "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                          "stage3_max_live_parameters", "stage3_max_reuse_distance"},
    "communication_data_type": None, "comms_logger": None,
}
SECTIONS = {"name", "description", "overrides", "env", "launch", "hardware", "software"}
LAYOUTS = ("1x1", "1x8", "2x8")


class VendorError(UserError):
    pass


@dataclass(frozen=True)
class VendorProfile:
    name: str
    path: Path  # the profile.toml
    overrides: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    deepspeed: dict = field(default_factory=dict)  # the DeepSpeed override, read
    launch: dict = field(default_factory=dict)
    hardware: dict = field(default_factory=dict)
    software: dict = field(default_factory=dict)
    description: str = ""
    sha256: str = ""  # of profile.toml and the DeepSpeed override, as read

    def to_json(self) -> dict:
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256, "description": self.description,
                "overrides": self.overrides, "env": self.env, "deepspeed": self.deepspeed, "launch": self.launch,
                "hardware": self.hardware, "software": self.software}


def resolve(name_or_path: str) -> Path:
    """--vendor NAME (a folder of vendors/) or a path to a profile folder or profile.toml."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / PROFILE_FILE
    if not path.is_file() and re.fullmatch(r"[A-Za-z0-9_-]+", name_or_path):
        path = VENDORS_DIR / name_or_path / PROFILE_FILE
    if not path.is_file():
        known = sorted(p.name for p in VENDORS_DIR.iterdir() if (p / PROFILE_FILE).is_file()) \
            if VENDORS_DIR.is_dir() else []
        raise VendorError(f"--vendor {name_or_path}: no {PROFILE_FILE} there (shipped profiles: {', '.join(known)}; "
                          "or a folder holding a profile.toml)")
    return path


def load(name_or_path: str) -> VendorProfile:
    """The profile, checked against FlagPerf's rule; a wrong key is one line naming it and the file."""
    path = resolve(name_or_path)
    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise VendorError(f"{path}: not valid TOML ({e})") from None
    unknown = sorted(set(data) - SECTIONS)
    if unknown:
        raise VendorError(f"{path}: unknown section or key '{unknown[0]}' (a profile has {', '.join(sorted(SECTIONS))})")
    for section in ("overrides", "env", "launch", "hardware", "software"):
        if not isinstance(data.get(section, {}), dict):
            raise VendorError(f"{path}: [{section}] must be a table")
    overrides = dict(data.get("overrides", {}))
    for key in overrides:
        _check_override(path, key)
    env = {str(k): str(v) for k, v in data.get("env", {}).items()}
    for key in env:
        if not ALLOWED_ENV.fullmatch(key):
            raise VendorError(f"{path}: env.{key} is not a communication, allocator, threading or compiler variable; "
                              "a profile may set NCCL_*, HCCL_*, CCL_*, GLOO_*, FI_*, UCX_*, PYTORCH_*_ALLOC_CONF, "
                              "OMP_NUM_THREADS and the like only")
    launch = dict(data.get("launch", {}))
    digest = hashlib.sha256(raw)
    deepspeed = {}
    if "deepspeed" in launch:
        ds_path = _inside(path, launch["deepspeed"], "launch.deepspeed")
        ds_raw = ds_path.read_bytes()
        try:
            deepspeed = loads(ds_raw)
        except ValueError as e:
            raise VendorError(f"{ds_path}: not valid JSON ({e})") from None
        _check_deepspeed(ds_path, deepspeed)
        digest.update(ds_raw)
    for key, value in launch.items():
        if key in LAYOUTS or key == "requirements":
            _inside(path, value, f"launch.{key}")
        elif key != "deepspeed":
            raise VendorError(f"{path}: launch.{key} is not one of {', '.join(LAYOUTS)}, requirements, deepspeed")
    return VendorProfile(name=str(data.get("name", path.parent.name)), path=path, overrides=overrides, env=env,
                         deepspeed=deepspeed, launch=launch, hardware=dict(data.get("hardware", {})),
                         software=dict(data.get("software", {})), description=str(data.get("description", "")),
                         sha256=digest.hexdigest())


def _check_override(path: Path, key: str) -> None:
    for kind, keys in FORBIDDEN_OVERRIDES.items():
        if key in keys:
            raise VendorError(f"{path}: overrides.{key} changes {kind}; FlagPerf lets a vendor change only what is "
                              f"tied to the hardware ({', '.join(ALLOWED_OVERRIDES)})")
    if key not in ALLOWED_OVERRIDES:
        raise VendorError(f"{path}: overrides.{key} is not a flag a profile may set ({', '.join(ALLOWED_OVERRIDES)})")


def _check_deepspeed(path: Path, cfg) -> None:
    if not isinstance(cfg, dict):
        raise VendorError(f"{path}: not a JSON object")
    for key, value in cfg.items():
        if key not in ALLOWED_DEEPSPEED:
            raise VendorError(f"{path}: {key} is not a communication setting; a vendor's DeepSpeed override may set "
                              f"{', '.join(ALLOWED_DEEPSPEED)} only")
        allowed = ALLOWED_DEEPSPEED[key]
        if allowed is not None:
            if not isinstance(value, dict):
                raise VendorError(f"{path}: {key} must be an object")
            for sub in value:
                if sub not in allowed:
                    raise VendorError(f"{path}: {key}.{sub} is not a bucket, overlap or stage setting "
                                      f"({', '.join(sorted(allowed))})")


def _inside(profile: Path, rel, what: str) -> Path:
    """A file the profile names, relative to its folder: inside that folder or this repository (a shipped
    profile names the repository's accelerate configs), nowhere else."""
    base = profile.parent.resolve()
    target = (base / str(rel)).resolve()
    if not any(root in target.parents for root in (base, VENDORS_DIR.parent)) or not target.is_file():
        raise VendorError(f"{profile}: {what} = {rel!r} is not a file inside {base} or the repository")
    return target


def hardware_for(profile: dict, device_name: str) -> dict:
    """The [hardware] facts for DEVICE_NAME: the plain keys, then the first table whose key is in the name."""
    plain = {k: v for k, v in profile.items() if not isinstance(v, dict)}
    match = next((v for k, v in profile.items() if isinstance(v, dict) and k.lower() in device_name.lower()), {})
    return {**plain, **match}

