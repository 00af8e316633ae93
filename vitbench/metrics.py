"""Every metric name a run writes, defined once, and the device memory monitor.

One scheme, torchtitan's: `group/name(unit)`, no group for the headline figures. The per-step rows
(profiler, console line, metrics.jsonl, W&B under `train/`, the W&B panels and the step timelines) use
these constants. results.json keeps the seed's own names (`p_whole`, `p_core`, `mfu_core(%)`, ...), which
the reports and benchmark scripts read as written there.
"""

from __future__ import annotations

import resource

GIB = 1024**3

# ---- per-interval rows (profiler) ----------------------------------------------------------------
THROUGHPUT = "throughput(img/s)"
THROUGHPUT_PER_DEVICE = "throughput_per_device(img/s)"
TFLOPS_PER_DEVICE = "tflops_per_device(TFLOP/s)"
MFU = "mfu(%)"
STEP_TIME = "time/step(s)"
COMPUTE_TIME = "time/compute(s)"
DATA_WAIT = "time/data_wait(s)"
DATA_WAIT_PCT = "time/data_wait(%)"
# The same per step on the fastest rank (the figures above are the slowest rank's): a gap is a straggler.
COMPUTE_TIME_FASTEST = "time/compute_fastest_rank(s)"
DATA_WAIT_FASTEST = "time/data_wait_fastest_rank(s)"
# ---- memory (DeviceMemoryMonitor) ----------------------------------------------------------------
MEM_MAX_ALLOCATED = "memory/max_allocated(GiB)"
MEM_MAX_ALLOCATED_PCT = "memory/max_allocated(%)"
MEM_MAX_RESERVED = "memory/max_reserved(GiB)"
MEM_MAX_RESERVED_PCT = "memory/max_reserved(%)"
MEM_ALLOC_RETRIES = "memory/num_alloc_retries"
MEM_OOMS = "memory/num_ooms"
MEM_DEVICE_USED = "memory/device_used(GiB)"
MEM_DEVICE_TOTAL = "memory/device_total(GiB)"
MEM_HOST_RSS = "memory/host_rss(GiB)"
MEM_HOST_PEAK_RSS = "memory/host_peak_rss(GiB)"
# ---- hardware (vitbench.monitor: this rank's device and host, the last sample; absent sensors never logged) --
POWER = "power/device(W)"
TEMP = "temp/device(C)"
UTIL_DEVICE = "util/device(%)"
CLOCK_SM = "clock/sm(MHz)"
UTIL_HOST_CPU = "util/host_cpu(%)"
# ---- training state (the loop) -------------------------------------------------------------------
STEP = "step"
EPOCH = "epoch"
LOSS = "loss"
LR = "lr"
GRAD_NORM = "grad_norm"
LOSS_SCALE = "loss_scale"
# ---- evaluation rows -----------------------------------------------------------------------------
ACC1 = "acc1"
ACC5 = "acc5"
VAL_LOSS = "loss"
EVAL_SAMPLES = "samples"

# W&B namespaces: train rows are plotted against train/step, evaluations against eval/epoch.
TRAIN_PREFIX = "train/"
EVAL_PREFIX = "eval/"


class DeviceMemoryMonitor:
    """Memory of one rank since the previous `probe()` (allocator peaks are reset after each), in the names
    above, as torchtitan's DeviceMemoryMonitor, through the device layer (vitbench.device): allocator peaks,
    % of capacity, allocator retries and OOMs where the device reports them, and the whole device's used/total
    (on CUDA cudaMemGetInfo, the figure nvidia-smi shows). Everywhere: this process's resident set and its
    peak (the only memory a CPU run has)."""

    def __init__(self, device_layer, device):
        import psutil

        self.layer, self.device, self._proc = device_layer, device, psutil.Process()
        self.on_device = not device_layer.host_memory
        if self.on_device:
            device_layer.reset_memory_peaks(device)
            self.capacity = device_layer.total_memory(device)

    def probe(self) -> dict:
        out = {MEM_HOST_RSS: self._proc.memory_info().rss / GIB,
               MEM_HOST_PEAK_RSS: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
        if self.on_device:
            m = self.layer.memory(self.device)
            out.update({
                MEM_MAX_ALLOCATED: m["allocated_peak"] / GIB,
                MEM_MAX_ALLOCATED_PCT: 100.0 * m["allocated_peak"] / self.capacity,
                MEM_MAX_RESERVED: m["reserved_peak"] / GIB, MEM_MAX_RESERVED_PCT: 100.0 * m["reserved_peak"] / self.capacity,
                MEM_ALLOC_RETRIES: float(m["alloc_retries"]), MEM_OOMS: float(m["ooms"]),
                MEM_DEVICE_USED: m["used"] / GIB, MEM_DEVICE_TOTAL: m["total"] / GIB,
            })
            self.layer.reset_memory_peaks(self.device)
        return out

    @staticmethod
    def summary(peak: dict) -> dict:
        """results.json's memory fields from the run's peaks (max over probes and ranks)."""
        if MEM_DEVICE_USED in peak:
            return {"mem_used_gib": peak[MEM_DEVICE_USED], "mem_total_gib": peak[MEM_DEVICE_TOTAL],
                    "mem_max_allocated_gib": peak[MEM_MAX_ALLOCATED], "mem_max_reserved_gib": peak[MEM_MAX_RESERVED],
                    "mem_alloc_retries": int(peak[MEM_ALLOC_RETRIES]), "mem_ooms": int(peak[MEM_OOMS]),
                    "mem_source": "device memory used (the device's free/total query; CUDA: cudaMemGetInfo, as "
                                  "nvidia-smi), peak over the run, max over ranks"}
        if MEM_HOST_PEAK_RSS in peak:
            import psutil

            return {"mem_used_gib": peak[MEM_HOST_PEAK_RSS], "mem_total_gib": psutil.virtual_memory().total / GIB,
                    "mem_source": "no device memory (CPU run): peak RSS of the largest rank / the machine's memory"}
        return {}
