"""The facts a results file carries besides the figures: launch layout, device, software, git commit."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from vitbench.device import Device, cpu_flags, cpu_model


def layout(environ=os.environ) -> dict:
    """Machines x processes per machine, from the launcher's environment."""
    world = int(environ.get("WORLD_SIZE", "1"))
    per_node = int(environ.get("LOCAL_WORLD_SIZE", world))
    return {"world_size": world, "nnodes": max(1, world // max(per_node, 1)), "nproc_per_node": per_node}


def host_ip() -> str | None:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a SLURM step or a container may allow fewer than the
    machine has), not os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class MachineFacts:
    """What a Plan needs to know of the machine, asked once at start (`probe`); tests pass their own."""

    device_type: str  # the device layer's kind: "cuda", "cpu", "xpu", "npu", "hpu", ...
    device_name: str
    capability: tuple[int, int] | None  # the device's compute capability, where it has one
    fp16: bool  # DeepSpeed's accelerator reports fp16 weights + optimizer support
    bf16: bool
    autocast: bool  # torch autocast exists for the device
    cpus: int  # usable_cpus()
    host_ip: str | None = None  # what this host's name resolves to (a process group binds to it)

    @classmethod
    def probe(cls, device: Device | None = None) -> "MachineFacts":
        import torch

        device = device or Device()
        acc = device.acc
        return cls(device_type=device.kind, device_name=device.product_name(), capability=device.capability(),
                   fp16=bool(acc.is_fp16_supported()), bf16=bool(acc.is_bf16_supported()),
                   autocast=torch.amp.is_autocast_available(device.kind), cpus=usable_cpus(), host_ip=host_ip())


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


def os_release() -> str | None:
    """The distribution's name and version (/etc/os-release's PRETTY_NAME), e.g. 'Ubuntu 22.04.4 LTS'."""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.partition("=")[2].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def environment(device: Device, repo: Path) -> dict:
    """The machine and software of this run (results.json's `environment`); DEVICE: the device layer."""
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
        "os": os_release(), "kernel": platform.release(), "cpu_model": cpu_model(),
        "device_type": device.kind,
        "device_name": device.product_name() if not device.host_memory else
        (cpu_model() or platform.processor() or platform.machine()),
        **device.software(),
    }
    if device.host_memory:
        env.update({"device_count": 1, "cpu_count": os.cpu_count(), "cpu_flags": cpu_flags()})
    env["usable_cpus"] = usable_cpus()
    env["launch"] = launch_environment()
    return env


# Variables that decide how ranks find each other and which network they use: recorded with every run, so a
# slow 2x8 row can be traced to its interface, transport or SLURM allocation.
_LAUNCH_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NNODES",
                    "SLURM_CPUS_PER_TASK", "SRUN_CPUS_PER_TASK", "SLURM_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT",
                    "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def launch_environment(environ=os.environ) -> dict:
    return {k: v for k, v in sorted(environ.items()) if k.startswith(_LAUNCH_PREFIXES)}
