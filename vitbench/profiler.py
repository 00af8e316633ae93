"""Step profiler: FlagPerf's throughput windows, measured correctly on asynchronous devices.

Windows (host clock unless noted; every window edge that follows queued device work synchronizes):
  train      train start -> train end                                  -> p_whole
  paused     evaluation and checkpoint saves inside the train window   -> p_train = samples / (train - paused)
  data wait  loop asks for a batch -> batch is queued on the device    (inside train - paused; on a GPU
             the copy, normalization and mixup kernels run after the
             host moves on, before the step's start event: their device
             time is in neither data wait nor compute, only in train)
  compute    forward + backward + optimizer step, timed with device    -> p_core = samples / compute
             events where the device has them (no per-step sync), else
             with the host clock (synchronous devices such as the CPU)
For every rank compute <= train - paused <= train, so p_core >= p_train >= p_whole. Ranks are combined
by taking the slowest rank's time for each window; compute and data wait are also reported for the
fastest rank, so a straggler shows as the gap.

"Steady" figures leave out the first `warmup_steps` steps (compilation, allocator growth, first
batches); the plain figures count every step, as FlagPerf does. `first_step_extra_s` is what the first step
took beyond a steady one: with --compile, the compile time (results.json `compile_s`).

The hot path per step is three host clock reads and two event records on devices with events (data start,
compute start, step end; the compute time comes from the events), four clock reads and a no-op sync without.
Each step's times are kept (steady window, slowest rank) for the spread of the figures (vitbench.stats).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

from vitbench import metrics as M
from vitbench.metrics import DeviceMemoryMonitor


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


class StepTimer:
    """The step timer: each step's data wait and compute (device events where the device has them), the pauses
    (evaluation, checkpoints, trace export) and the train window, reduced to the slowest rank; p_whole, p_train,
    p_core and MFU come from here (the module docstring says which window is which)."""

    def __init__(self, *, global_batch: int, world_size: int, warmup_steps: int = 10,
                 clock: Callable[[], float] = time.perf_counter, synchronize: Callable[[], None] = lambda: None,
                 make_event: Callable | None = None, reduce_max: Callable[[list[float]], list[float]] = lambda v: v,
                 flops_per_sample: float | None = None, peak_tflops_per_device: float | None = None,
                 memory_probe: Callable[[], dict] | None = None):
        self.global_batch, self.world_size, self.warmup_steps = global_batch, world_size, warmup_steps
        self.clock, self.sync, self.make_event, self.reduce_max = clock, synchronize, make_event, reduce_max
        self.flops_per_sample, self.peak = flops_per_sample, peak_tflops_per_device
        self.memory_probe = memory_probe or (lambda: {})  # e.g. DeviceMemoryMonitor(device).probe
        self.steps = 0
        self.first_step_compute = None  # seconds, this launch's first step
        self.train_start_t = self.train_end_t = None
        self.paused = {}  # kind -> seconds
        self.data_wait = self.compute = 0.0
        self._pending = []  # (step, start_event, end_event) not yet resolved
        self._free_events = []
        self._steady = None  # (clock, steps, paused) when warm-up ended
        self._steady_compute = 0.0
        self._row = None  # totals at the previous row
        self.mem_peak: dict[str, float] = {}  # max over ranks and over probes
        # per step of this launch, for the spread of the steady figures: wall time between step ends without
        # pauses (p_train's window) and compute time (p_core's)
        self.step_train_s: list[float] = []
        self.step_compute_s: list[float] = []

    # ---- windows -------------------------------------------------------------------------
    def train_start(self) -> None:
        self.sync()
        self.train_start_t = self.clock()
        self._row = self._totals(self.train_start_t)
        self._last_end, self._paused_at_end = self.train_start_t, 0.0
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
        t = self.clock()  # one more host clock read per step
        self.step_train_s.append(t - self._last_end - (self.paused_total - self._paused_at_end))
        self._last_end, self._paused_at_end = t, self.paused_total
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
        """A window inside training that is not training: evaluation, checkpoint saving, trace export."""
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
        self.step_compute_s.append(seconds)  # resolved in step order
        if step == 1:
            self.first_step_compute = seconds  # torch.compile compiles here; the allocator grows here
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

    def _over_ranks(self, values: dict, spread: tuple[str, ...] = ()) -> tuple[dict, dict]:
        """Each named figure's maximum over ranks, and for the SPREAD names also the minimum, in one all-reduce
        (a MAX of the negated value is the minimum); memory peaks are folded into the run's."""
        values = {**values, **self.memory_probe()}
        names = list(values)
        reduced = self.reduce_max([values[k] for k in names] + [-values[k] for k in spread])
        worst = dict(zip(names, reduced))
        fastest = {k: -v for k, v in zip(spread, reduced[len(names):])}
        for k, v in worst.items():
            if k.startswith("memory/"):
                self.mem_peak[k] = max(v, self.mem_peak.get(k, 0.0))
        return worst, fastest

    # ---- per-interval row ----------------------------------------------------------------
    def interval_row(self) -> dict:
        """Figures since the previous row (pauses left out). Every rank must call it at the same step."""
        self._resolve()
        now = self._totals(self.clock())
        prev, self._row = self._row, now
        steps = now["steps"] - prev["steps"]
        wall = max(now["t"] - prev["t"] - (now["paused"] - prev["paused"]), 1e-12)
        worst, fastest = self._over_ranks({"data_wait": now["data_wait"] - prev["data_wait"],
                                           "compute": now["compute"] - prev["compute"], "wall": wall},
                                          spread=("data_wait", "compute"))
        data_wait, compute, wall = worst.pop("data_wait"), worst.pop("compute"), worst.pop("wall")
        samples = steps * self.global_batch
        row = {
            M.THROUGHPUT: samples / wall,
            M.THROUGHPUT_PER_DEVICE: samples / wall / self.world_size,
            M.STEP_TIME: wall / max(steps, 1),
            M.COMPUTE_TIME: compute / max(steps, 1),
            M.DATA_WAIT: data_wait / max(steps, 1),
            M.DATA_WAIT_PCT: 100.0 * data_wait / wall,
            M.COMPUTE_TIME_FASTEST: fastest["compute"] / max(steps, 1),
            M.DATA_WAIT_FASTEST: fastest["data_wait"] / max(steps, 1),
        }
        if self.flops_per_sample:
            tflops = self._tflops_per_device(samples / wall)
            row[M.TFLOPS_PER_DEVICE] = tflops
            if self.peak:
                row[M.MFU] = 100.0 * tflops / self.peak
        row.update(worst)  # the memory figures
        return row

    # ---- run summary ---------------------------------------------------------------------
    def summary(self) -> dict:
        """The run's throughput figures. Every rank must call it (it reduces over ranks): each window is
        the slowest rank's, pauses included."""
        end = self.train_end_t if self.train_end_t is not None else self.clock()
        train = end - self.train_start_t
        samples = self.steps * self.global_batch
        per_rank = {"train": train, "train_unpaused": train - self.paused_total, "compute": self.compute,
                    "data_wait": self.data_wait, "eval": self.paused.get("eval", 0.0),
                    "checkpoint": self.paused.get("checkpoint", 0.0), "first_step": self.first_step_compute or 0.0}
        steady = self._steady is not None and self.steps > self.warmup_steps
        if steady:
            t0, s0, paused0 = self._steady
            steady_samples = (self.steps - s0) * self.global_batch
            per_rank.update(steady_train=end - t0, steady_train_unpaused=end - t0 - (self.paused_total - paused0),
                            steady_compute=self._steady_compute)
        w, fastest = self._over_ranks(per_rank, spread=("compute", "data_wait"))
        out = {
            "train_samples": samples,
            "train_time": w["train"],
            "eval_time": w["eval"],
            "checkpoint_time_in_train_window": w["checkpoint"],  # the periodic saves (results: every save)
            "data_wait_time": w["data_wait"],
            "compute_time": w["compute"],
            "compute_time_fastest_rank": fastest["compute"],
            "data_wait_time_fastest_rank": fastest["data_wait"],
            "p_whole": _rate(samples, w["train"]),
            "p_train": _rate(samples, w["train_unpaused"]),
            "p_core": _rate(samples, w["compute"]),
            "steady_warmup_steps": self.warmup_steps,
            "first_step_s": w["first_step"] if self.first_step_compute is not None else None,
            **DeviceMemoryMonitor.summary(self.mem_peak),
        }
        if steady:
            out.update({"p_whole_steady": _rate(steady_samples, w["steady_train"]),
                        "p_train_steady": _rate(steady_samples, w["steady_train_unpaused"]),
                        "p_core_steady": _rate(steady_samples, w["steady_compute"])})
            if self.first_step_compute is not None:  # what the first step cost beyond a steady one
                out["first_step_extra_s"] = w["first_step"] - w["steady_compute"] / (self.steps - s0)
        if steady:
            out.update(self._step_spread(s0, steady_samples / (self.steps - s0),
                                         (self.paused_total - paused0) / (self.steps - s0)))
        if self.flops_per_sample and out["p_core"]:
            out["tflops_per_device_core"] = self._tflops_per_device(out["p_core"])
        if self.flops_per_sample and self.peak:
            for window in ("core", "train", "core_steady", "train_steady"):
                rate = out.get(f"p_{window}")
                if rate:
                    out[f"mfu_{window}(%)"] = 100.0 * self._tflops_per_device(rate) / self.peak
        return out

    def _step_spread(self, first: int, samples_per_step: float, paused_per_step: float) -> dict:
        """The steady steps' times, the slowest rank's per step (one all-reduce), kept in results.json (averaged
        in blocks beyond MAX_STEP_TIMES points) so a later comparison can recompute intervals; and the spread of
        each steady figure (vitbench.stats: median, p5/p95, a block-bootstrap 95% interval of the mean)."""
        from vitbench import stats

        train, compute = self.step_train_s[first:], self.step_compute_s[first:]
        n = min(len(train), len(compute))
        block = max(1, -(-n // MAX_STEP_TIMES))
        train, compute = _block_means(train[:n], block), _block_means(compute[:n], block)
        reduced = self.reduce_max(train + compute)
        train, compute = reduced[:len(train)], reduced[len(train):]
        return {"step_times": {"first_step": first + 1, "block": block, "samples_per_step": samples_per_step,
                               "train_s": [round(x, 7) for x in train], "compute_s": [round(x, 7) for x in compute],
                               "paused_per_step_s": paused_per_step},
                "spread": {"p_core_steady": stats.spread(compute, samples_per_step),
                           "p_train_steady": stats.spread(train, samples_per_step),
                           "p_whole_steady": stats.spread(train, samples_per_step, paused_per_step)}}

    def _tflops_per_device(self, images_per_s: float) -> float:
        return self.flops_per_sample * images_per_s / self.world_size / 1e12


MAX_STEP_TIMES = 20_000  # points of step times kept per figure in results.json


def _block_means(values: list[float], block: int) -> list[float]:
    """Means of consecutive BLOCK values, whole blocks only: a point's mean time per step."""
    whole = len(values) // block * block
    return [sum(values[i:i + block]) / block for i in range(0, whole, block)]


def _rate(samples: float, seconds: float) -> float | None:
    return samples / seconds if seconds > 0 and samples else None


class TraceWindow:
    """`--profile-steps A:B`: a torch.profiler trace of steps A..B-1 of the run (counted as the run counts
    them, so also after a resume), driven by `torch.profiler.schedule` and exported by `on_trace_ready`.
    Stopping and exporting the trace is a pause of the step profiler, not training; a run that ends inside
    the window still exports what it traced (on exit)."""

    def __init__(self, steps: tuple[int, int] | None, first_step: int, out_dir, rank: int, pause):
        self.prof, self.pause, self.end = None, pause, None
        if steps is None or steps[1] <= first_step:
            return
        import torch

        start, self.end = max(steps[0], first_step), steps[1]
        warmup = min(1, start - first_step)  # one untraced profiler step first, where there is room for it
        self.trace_path = out_dir / "profile" / f"trace_rank{rank}.json"
        self.prof = torch.profiler.profile(
            schedule=torch.profiler.schedule(wait=start - first_step - warmup, warmup=warmup,
                                             active=self.end - start, repeat=1),
            on_trace_ready=self._export, record_shapes=True)

    def _export(self, prof) -> None:
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.trace_path))

    def __enter__(self):
        if self.prof:
            self.prof.start()
        return self

    def step(self, step_done: int) -> None:
        """After each optimizer step; `step_done` is the run's step count after it."""
        if self.prof is None:
            return
        if step_done == self.end:  # this call stops the trace and exports it
            with self.pause("profile_export"):
                self.prof.step()
            self.prof = None
        else:
            self.prof.step()

    def __exit__(self, *exc):
        if self.prof:  # ended inside (or before) the window: export what was traced
            with self.pause("profile_export"):
                self.prof.stop()
            self.prof = None
