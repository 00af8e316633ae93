"""Step profiler: FlagPerf's throughput windows, measured correctly on asynchronous devices.

Windows (host clock unless noted; every window edge that follows queued device work synchronizes):
  train      train start -> train end                                  -> p_whole
  paused     evaluation and checkpoint saves inside the train window   -> p_train = samples / (train - paused)
  data wait  loop asks for a batch -> batch is on the device           (inside train - paused)
  compute    forward + backward + optimizer step, timed with device    -> p_core = samples / compute
             events where the device has them (no per-step sync), else
             with the host clock (synchronous devices such as the CPU)
For every rank compute <= train - paused <= train, so p_core >= p_train >= p_whole. Ranks are combined
by taking the slowest rank's time for each window.

"Steady" figures leave out the first `warmup_steps` steps (compilation, allocator growth, first
batches); the plain figures count every step, as FlagPerf does.

The hot path per step is three clock reads and, on devices with events, two event records.
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from typing import Callable

GIB = 1024**3

# Dense peak TFLOP/s per device by (name fragment, precision class). Checked in this order.
PEAK_TFLOPS = [
    ("H200", {"fp32": 67.0, "tf32": 494.7, "16bit": 989.4}),
    ("H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "16bit": 756.0}),
    ("H100", {"fp32": 67.0, "tf32": 494.7, "16bit": 989.4}),
    ("H800", {"fp32": 67.0, "tf32": 494.7, "16bit": 989.4}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "16bit": 312.0}),
    ("A800", {"fp32": 19.5, "tf32": 156.0, "16bit": 312.0}),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "16bit": 362.0}),
    ("V100", {"fp32": 15.7, "tf32": 15.7, "16bit": 125.0}),
]
PRECISION_CLASS = {"fp32": "fp32", "tf32": "tf32", "amp": "16bit", "fp16": "16bit", "bf16": "16bit"}


def peak_tflops(device_name: str | None, precision: str) -> float | None:
    """Peak dense TFLOP/s of one device for the precision, or None when unknown (e.g. CPUs)."""
    if not device_name:
        return None
    for fragment, peaks in PEAK_TFLOPS:
        if fragment.lower() in device_name.lower():
            return peaks[PRECISION_CLASS[precision]]
    return None


def train_flops_per_sample(model_fn: Callable, img_size: int) -> float:
    """Forward + backward FLOPs of one image, from PyTorch's FLOP counter on a meta-device copy of the
    model (no memory, no compute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = model_fn()
        x = torch.empty(1, 3, img_size, img_size)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    return float(counter.get_total_flops())


class StepProfiler:
    def __init__(self, *, global_batch: int, world_size: int, warmup_steps: int = 10,
                 clock: Callable[[], float] = time.perf_counter, synchronize: Callable[[], None] = lambda: None,
                 make_event: Callable | None = None, reduce_max: Callable[[list[float]], list[float]] = lambda v: v,
                 flops_per_sample: float | None = None, peak_tflops_per_device: float | None = None,
                 memory_probe: Callable[[], dict] | None = None):
        self.global_batch, self.world_size, self.warmup_steps = global_batch, world_size, warmup_steps
        self.clock, self.sync, self.make_event, self.reduce_max = clock, synchronize, make_event, reduce_max
        self.flops_per_sample, self.peak = flops_per_sample, peak_tflops_per_device
        self.memory_probe = memory_probe or (lambda: {})
        self.steps = 0
        self.train_start_t = self.train_end_t = None
        self.paused = {}  # kind -> seconds
        self.data_wait = self.compute = 0.0
        self._pending = []  # (step, start_event, end_event) not yet resolved
        self._free_events = []
        self._steady = None  # (clock, steps, paused) when warm-up ended
        self._steady_compute = 0.0
        self._row = None  # totals at the previous row
        self.mem_peak: dict[str, float] = {}  # max over ranks and over probes

    # ---- windows -------------------------------------------------------------------------
    def train_start(self) -> None:
        self.sync()
        self.train_start_t = self.clock()
        self._row = self._totals(self.train_start_t)
        if self.warmup_steps == 0:
            self._steady = (self.train_start_t, 0, 0.0)

    def train_end(self) -> None:
        self._resolve()
        self.train_end_t = self.clock()

    def data_start(self) -> None:
        self._data_t = self.clock()

    def compute_start(self) -> None:
        t = self.clock()
        self.data_wait += t - self._data_t
        self._compute_t = t
        if self.make_event:
            ev = self._free_events.pop() if self._free_events else self.make_event()
            ev.record()
            self._start_event = ev

    def step_end(self) -> None:
        self.steps += 1
        if self.make_event:
            ev = self._free_events.pop() if self._free_events else self.make_event()
            ev.record()
            self._pending.append((self.steps, self._start_event, ev))
        else:
            self.sync()  # a no-op on synchronous devices
            self._add_compute(self.steps, self.clock() - self._compute_t)
        if self.steps == self.warmup_steps:
            self._resolve()
            self._steady = (self.clock(), self.steps, self.paused_total)

    @contextmanager
    def pause(self, kind: str):
        """A window inside training that is not training: evaluation, checkpoint saving."""
        self._resolve()  # queued training work belongs to training, not to the pause
        t = self.clock()
        try:
            yield
        finally:
            self.sync()
            self.paused[kind] = self.paused.get(kind, 0.0) + self.clock() - t

    @property
    def paused_total(self) -> float:
        return sum(self.paused.values())

    def _add_compute(self, step: int, seconds: float) -> None:
        self.compute += seconds
        if step > self.warmup_steps:
            self._steady_compute += seconds

    def _resolve(self) -> None:
        """Synchronize and fold finished device-event pairs into the compute total."""
        self.sync()
        for step, start, end in self._pending:
            self._add_compute(step, start.elapsed_time(end) / 1000.0)
            self._free_events += [start, end]
        self._pending.clear()

    def _totals(self, t: float) -> dict:
        return {"t": t, "steps": self.steps, "paused": self.paused_total, "data_wait": self.data_wait,
                "compute": self.compute}

    # ---- per-interval row ----------------------------------------------------------------
    def interval_row(self) -> dict:
        """Figures since the previous row (pauses left out). Every rank must call it at the same step."""
        self._resolve()
        now = self._totals(self.clock())
        prev, self._row = self._row, now
        steps = now["steps"] - prev["steps"]
        wall = max(now["t"] - prev["t"] - (now["paused"] - prev["paused"]), 1e-12)
        mem = self.memory_probe()
        mem_keys = sorted(mem)
        per_rank = [now["data_wait"] - prev["data_wait"], now["compute"] - prev["compute"], wall]
        per_rank += [mem[k] for k in mem_keys]
        worst = self.reduce_max(per_rank)
        data_wait, compute, wall = worst[:3]
        samples = steps * self.global_batch
        row = {
            "throughput(img/s)": samples / wall,
            "throughput_per_device(img/s)": samples / wall / self.world_size,
            "step_time(s)": wall / max(steps, 1),
            "compute_time(s)": compute / max(steps, 1),
            "data_wait(s)": data_wait / max(steps, 1),
            "data_wait(%)": 100.0 * data_wait / wall,
        }
        if self.flops_per_sample:
            tflops = self.flops_per_sample * samples / wall / self.world_size / 1e12
            row["tflops_per_device"] = tflops
            if self.peak:
                row["mfu(%)"] = 100.0 * tflops / self.peak
        mem = dict(zip(mem_keys, worst[3:]))
        self._track_memory(mem)
        row.update(mem)
        return row

    def _track_memory(self, mem: dict) -> None:
        for k, v in mem.items():
            self.mem_peak[k] = max(v, self.mem_peak.get(k, 0.0))

    # ---- run summary ---------------------------------------------------------------------
    def summary(self) -> dict:
        """The run's throughput figures. Every rank must call it (it reduces over ranks)."""
        end = self.train_end_t if self.train_end_t is not None else self.clock()
        train = end - self.train_start_t
        samples = self.steps * self.global_batch
        vals = [train, train - self.paused_total, self.compute, self.data_wait]
        steady_samples = 0
        if self._steady is not None and self.steps > self.warmup_steps:
            t0, s0, paused0 = self._steady
            steady_samples = (self.steps - s0) * self.global_batch
            steady_train = end - t0
            vals += [steady_train, steady_train - (self.paused_total - paused0), self._steady_compute]
        mem = self.memory_probe()
        mem_keys = sorted(mem)
        worst = self.reduce_max(vals + [mem[k] for k in mem_keys])
        self._track_memory(dict(zip(mem_keys, worst[len(vals):])))
        out = {
            "train_samples": samples,
            "train_time": worst[0],
            "eval_time": self.paused.get("eval", 0.0),
            "checkpoint_time": self.paused.get("checkpoint", 0.0),
            "data_wait_time": worst[3],
            "compute_time": worst[2],
            "p_whole": _rate(samples, worst[0]),
            "p_train": _rate(samples, worst[1]),
            "p_core": _rate(samples, worst[2]),
            "steady_warmup_steps": self.warmup_steps,
            **self.memory_summary(),
        }
        if steady_samples:
            out.update({"p_whole_steady": _rate(steady_samples, worst[4]),
                        "p_train_steady": _rate(steady_samples, worst[5]),
                        "p_core_steady": _rate(steady_samples, worst[6])})
        if self.flops_per_sample and out["p_core"]:
            out["tflops_per_device_core"] = self.flops_per_sample * out["p_core"] / self.world_size / 1e12
            if self.peak:
                out["mfu_core(%)"] = 100.0 * out["tflops_per_device_core"] / self.peak
                out["mfu_train(%)"] = 100.0 * self.flops_per_sample * out["p_train"] / self.world_size / 1e12 \
                    / self.peak
        return out


    def memory_summary(self) -> dict:
        peak = self.mem_peak
        if "memory/device_used(GiB)" in peak:
            return {"mem_used_gib": peak["memory/device_used(GiB)"], "mem_total_gib": peak["memory/device_total(GiB)"],
                    "mem_max_allocated_gib": peak["memory/max_allocated(GiB)"],
                    "mem_max_reserved_gib": peak["memory/max_reserved(GiB)"],
                    "mem_source": "device memory used (cudaMemGetInfo, as nvidia-smi), peak over the run, "
                                  "max over ranks"}
        if "memory/host_peak_rss(GiB)" in peak:
            import psutil

            return {"mem_used_gib": peak["memory/host_peak_rss(GiB)"],
                    "mem_total_gib": psutil.virtual_memory().total / GIB,
                    "mem_source": "no device memory (CPU run): peak RSS of the largest rank / the machine's memory"}
        return {}


def _rate(samples: float, seconds: float) -> float | None:
    return samples / seconds if seconds > 0 and samples else None


def process_memory_probe(device) -> Callable[[], dict]:
    """Memory figures for one rank, in GiB. CUDA: allocator peaks since the last call (then reset)
    and the device's used/total (cudaMemGetInfo: the whole device, as nvidia-smi shows it).
    Everywhere: this process's resident set and its peak."""
    import psutil
    import torch

    proc = psutil.Process()

    def probe() -> dict:
        out = {"memory/host_rss(GiB)": proc.memory_info().rss / GIB,
               "memory/host_peak_rss(GiB)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            out.update({
                "memory/max_allocated(GiB)": torch.cuda.max_memory_allocated(device) / GIB,
                "memory/max_reserved(GiB)": torch.cuda.max_memory_reserved(device) / GIB,
                "memory/device_used(GiB)": (total - free) / GIB,
                "memory/device_total(GiB)": total / GIB,
            })
            torch.cuda.reset_peak_memory_stats(device)
        return out

    return probe
