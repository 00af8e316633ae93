"""The device layer: on this machine (DeepSpeed's CPU accelerator) and, for what cannot run here, through a
stand-in accelerator of another kind that answers DeepSpeed's accelerator API (the device script checks CUDA)."""

import os
from pathlib import Path

import psutil
import pytest
import torch
from deepspeed.accelerator import get_accelerator

from vitbench import metrics as M
from vitbench.device import Device, build_jit_ops
from vitbench.runinfo import MachineFacts


def test_the_cpu_goes_through_deepspeeds_accelerator():
    d = Device()
    acc = get_accelerator()
    assert d.kind == acc.device_name() == "cpu" and d.backend == acc.communication_backend_name()
    assert d.backend in ("gloo", "ccl") and d.synchronous and d.make_event() is None  # host clock on a CPU
    assert d.host_memory and d.memory(torch.device("cpu")) is None and not d.pins_memory
    used, total = d.used_and_total(torch.device("cpu"))
    assert total == psutil.virtual_memory().total and 0 < used < total
    facts = MachineFacts.probe(d)
    assert facts.device_type == "cpu" and facts.fp16 == bool(acc.is_fp16_supported())  # asked, never assumed
    assert facts.bf16 == bool(acc.is_bf16_supported())


class StandInAccelerator:
    """DeepSpeed's accelerator API as an NPU-like device would answer it (nothing here has one)."""

    def __init__(self):
        self.reset = 0

    def device_name(self, index=None):
        return "npu" if index is None else f"npu:{index}"

    def communication_backend_name(self):
        return "hccl"

    def is_synchronized_device(self):
        return False

    def Event(self, enable_timing=False):  # noqa: N802 (DeepSpeed's name)
        return ("event", enable_timing)

    def memory_stats(self, index):
        return {"num_alloc_retries": 2, "num_ooms": 0}

    def max_memory_allocated(self, index):
        return 3 * M.GIB

    def max_memory_reserved(self, index):
        return 4 * M.GIB

    def reset_peak_memory_stats(self, index):
        self.reset += 1

    def total_memory(self, index):
        return 64 * M.GIB

    def available_memory(self, index):
        return 58 * M.GIB


def test_another_kind_of_device_takes_backend_events_and_memory_from_the_accelerator():
    acc = StandInAccelerator()
    d = Device(acc)
    assert (d.kind, d.backend, d.synchronous) == ("npu", "hccl", False)
    assert d.make_event()() == ("event", True)
    assert d.memory(torch.device("cpu")) == {"allocated_peak": 3 * M.GIB, "reserved_peak": 4 * M.GIB,
                                             "alloc_retries": 2, "ooms": 0, "used": 6 * M.GIB, "total": 64 * M.GIB}
    monitor = M.DeviceMemoryMonitor(d, torch.device("cpu"))
    row = monitor.probe()
    assert row[M.MEM_DEVICE_USED] == 6.0 and row[M.MEM_DEVICE_TOTAL] == 64.0 and row[M.MEM_MAX_RESERVED] == 4.0
    assert row[M.MEM_MAX_ALLOCATED_PCT] == 100 * 3 / 64 and acc.reset == 2  # peaks reset at start and per probe
    summary = M.DeviceMemoryMonitor.summary(row)
    assert summary["mem_used_gib"] == 6.0 and "device memory used" in summary["mem_source"]


def test_deepspeeds_jit_ops_are_built_by_this_environments_ninja(monkeypatch):
    """Two ninja versions on PATH (the venv's pinned one, Debian's) rebuilt DeepSpeed's CPU comm op in turn, ~40 s
    a launch: the trainer puts the environment's bin first, once."""
    import sys

    from vitbench.device import pin_jit_build_tools

    venv_bin = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", venv_bin, "/bin"]))
    pin_jit_build_tools()
    pin_jit_build_tools()
    assert os.environ["PATH"].split(os.pathsep) == [venv_bin, "/usr/bin", venv_bin, "/bin"]
    assert (Path(venv_bin) / "ninja").is_file()  # the pinned ninja (pyproject.toml) is what PATH finds first


def test_set_up_builds_the_cpu_comm_op_once_and_a_launch_finds_it_built():
    """make setup calls build_jit_ops: on this CPU, DeepSpeed's shared-memory comm op, compiled into the
    extensions cache; asked again (as every launch's init_distributed does), nothing is rebuilt."""
    if get_accelerator().device_name() != "cpu":
        pytest.skip("the shared-memory comm op is the CPU accelerator's")
    assert build_jit_ops() == "deepspeed_shm_comm"
    library = Path(get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False).__file__)
    built = library.stat().st_mtime_ns
    assert build_jit_ops() == "deepspeed_shm_comm" and library.stat().st_mtime_ns == built
