"""The device layer: everything the trainer asks of its accelerator, in one place, over DeepSpeed's accelerator
abstraction (`deepspeed.accelerator.get_accelerator()`: cuda, ROCm's HIP build included, cpu, xpu, npu, hpu,
mlu, mps, sdaa, supa, klxpu). Nothing else in train_vit.py or vitbench/ reads `torch.cuda`
(tests/unit/test_layout.py checks); a CPU run goes through this layer like any other.

  kind, backend        the accelerator's name ("cuda", "cpu", "npu"...) and its process-group backend
                       (communication_backend_name(): nccl, gloo or ccl, hccl, cncl...)
  product_name,        what the device is (for the peak table and the report) and, where the device has
  capability           one, its compute capability
  make_event,          device events for the step profiler (None on synchronous devices: the host clock
  synchronize          is the truth there)
  memory               allocator peaks, reserved, retries and OOMs where the device reports them; device
                       used / total from the device's own free/total query (on CUDA cudaMemGetInfo, the
                       figure nvidia-smi shows), else the accelerator's total and available memory
  software             driver and library versions for results.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

GIB = 1024**3
# Devices whose memory is the host's: no device allocator to ask, the process's RSS is the figure.
HOST_DEVICES = ("cpu",)
# Devices a DataLoader can pin host memory for (page-locked copies, non-blocking).
PINNING_DEVICES = ("cuda", "xpu", "npu", "hpu", "mlu")


def pin_jit_build_tools() -> None:
    """Put this Python environment's own bin first on PATH, before DeepSpeed JIT-compiles an op (its CPU comm op
    at the first collective). It builds with whatever `ninja` PATH finds, and two ninja versions hash the same
    command differently: a launch whose PATH finds another ninja than the last one rebuilt the op (~40 s on 2
    cores, every rank waiting), and the next launch rebuilt it back. The environment's ninja is the pinned one."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir


def build_jit_ops(accelerator=None) -> str | None:
    """Compile, once, the JIT op a launch's process group loads (on CPUs, DeepSpeed's shared-memory collectives:
    ~40 s on 2 cores), so that `make setup` pays for it and not the first launch with every rank waiting.
    Returns the op's name, built or found cached; None where the accelerator has none (CUDA: NCCL's)."""
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    pin_jit_build_tools()
    builder = accelerator.create_op_builder("ShareMemCommBuilder")  # what deepspeed.comm loads at init
    if builder is None or not builder.is_compatible():
        return None
    builder.load(verbose=False)
    return builder.NAME


class Device:
    """This process's accelerator. ACCELERATOR: a DeepSpeed accelerator (default: the one DeepSpeed picks)."""

    def __init__(self, accelerator=None):
        if accelerator is None:
            from deepspeed.accelerator import get_accelerator

            accelerator = get_accelerator()
        self.acc = accelerator
        self.kind: str = accelerator.device_name()
        self.backend: str = accelerator.communication_backend_name()
        self.synchronous: bool = bool(accelerator.is_synchronized_device())

    # ---- what the device is -------------------------------------------------------------------
    @property
    def host_memory(self) -> bool:
        return self.kind in HOST_DEVICES

    @property
    def pins_memory(self) -> bool:
        return self.kind in PINNING_DEVICES

    def _module(self):
        """torch's module for this device (torch.cuda, torch.xpu, torch.npu...), or None."""
        import torch

        try:
            return torch.get_device_module(self.kind)
        except (RuntimeError, AttributeError):
            return None

    def product_name(self) -> str:
        """e.g. 'NVIDIA H200', 'AMD Instinct MI300X', 'GAUDI3', or the CPU's model name."""
        module = self._module()
        if not self.host_memory and module is not None and hasattr(module, "get_device_name"):
            return str(module.get_device_name())
        return cpu_model() or self.kind

    def capability(self) -> tuple[int, int] | None:
        """The compute capability (NVIDIA's; ROCm answers with its own), None where the device has none."""
        module = self._module()
        if self.host_memory or module is None or not hasattr(module, "get_device_capability"):
            return None
        return tuple(module.get_device_capability())

    # ---- timing -------------------------------------------------------------------------------
    def make_event(self):
        """A factory of timing events, or None on synchronous devices (the host clock is exact there)."""
        event_cls = None if self.synchronous else self.acc.Event
        return (lambda: event_cls(enable_timing=True)) if event_cls else None

    def synchronize(self) -> None:
        self.acc.synchronize()

    def current_stream(self, device):
        return self.acc.current_stream(_index(device))

    # ---- memory -------------------------------------------------------------------------------
    def reset_memory_peaks(self, device) -> None:
        if not self.host_memory:
            self.acc.reset_peak_memory_stats(_index(device))

    def memory(self, device) -> dict | None:
        """Bytes since the last reset: {allocated_peak, reserved_peak, alloc_retries, ooms, used, total}; None
        for host devices (their memory is the process's RSS, read by the caller)."""
        if self.host_memory:
            return None
        index = _index(device)
        stats = self.acc.memory_stats(index) or {}
        used, total = self.used_and_total(device)
        return {"allocated_peak": self.acc.max_memory_allocated(index),
                "reserved_peak": self.acc.max_memory_reserved(index),
                "alloc_retries": stats.get("num_alloc_retries", 0), "ooms": stats.get("num_ooms", 0),
                "used": used, "total": total}

    def used_and_total(self, device) -> tuple[int, int]:
        """The whole device's memory in use and its capacity: the device's own free/total query where torch
        has one (CUDA: cudaMemGetInfo, what nvidia-smi shows), else the accelerator's total - available."""
        module, index = self._module(), _index(device)
        if module is not None and hasattr(module, "mem_get_info"):
            free, total = module.mem_get_info(index)
        else:
            total = self.acc.total_memory(index)
            free = self.acc.available_memory(index)
        return total - free, total

    def total_memory(self, device=None) -> int:
        return self.acc.total_memory(_index(device))

    # ---- software -----------------------------------------------------------------------------
    def software(self) -> dict:
        """Driver and library versions of this device's stack (results.json's environment)."""
        import torch

        out = {"backend": self.backend}
        if self.host_memory:
            return out
        module = self._module()
        out["device_count"] = self.acc.device_count()
        if self.kind == "cuda":
            out.update({"cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
                        "cudnn": torch.backends.cudnn.version(), "driver": nvidia_driver()})
        try:
            version = self.acc.communication_backend_version()
            out[f"{self.backend}_version"] = ".".join(map(str, version)) if isinstance(version, tuple) else version
        except (AttributeError, NotImplementedError, RuntimeError):
            pass
        if module is not None and self.kind != "cuda" and hasattr(module, "get_device_properties"):
            out["properties"] = str(module.get_device_properties(0))
        return out


def _index(device) -> int | None:
    """A torch.device's (or int's) index, as DeepSpeed's accelerator methods take it."""
    if device is None or isinstance(device, int):
        return device
    return getattr(device, "index", None)


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version through NVML, None where there is none."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # no library, no driver, no device: NVML raises its own error types
        return None


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
