"""The facts a results file carries besides the figures: launch layout, device, software, git commit."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path


def layout() -> dict:
    """Machines x processes per machine, from the launcher's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return {"world_size": world, "nnodes": max(1, world // max(per_node, 1)), "nproc_per_node": per_node}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """Plain `python train_vit.py`: make it a one-process launch so the same DeepSpeed path runs."""
    if "LOCAL_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def git_commit(repo: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device, repo: Path) -> dict:
    import torch

    env = {
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": _version("deepspeed"),
        "accelerate": _version("accelerate"),
        "timm": _version("timm"),
        "webdataset": _version("webdataset"),
        "git_commit": git_commit(repo),
        "device_type": device.type,
    }
    if device.type == "cuda":
        env.update({
            "device_name": torch.cuda.get_device_name(device),
            "device_count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            "driver": _nvidia_driver(),
        })
    else:
        env.update({"device_name": cpu_model() or platform.processor() or platform.machine(), "device_count": 1,
                    "cpu_count": os.cpu_count(), "cpu_flags": cpu_flags()})
    return env


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str | None:
    """The CPU's marketing name (Linux), e.g. 'AMD EPYC 9554 64-Core Processor'."""
    return _cpuinfo_field("model name")


def cpu_flags() -> list[str]:
    """The CPU features that decide CPU bf16/fp16 speed (machines of one kind differ in them)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")
    flags = set((_cpuinfo_field("flags") or "").split())
    return [f for f in wanted if f in flags]


def _nvidia_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:
        return None

