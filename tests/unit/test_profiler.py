"""The profiler's metric math on a fake clock, and the FLOP/peak inputs of MFU."""

import pytest

from vitbench import metrics as M
from vitbench.peaks import PEAK_TFLOPS, peak_tflops
from vitbench.precision import SPECS
from vitbench.profiler import StepTimer, train_flops_per_sample


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t

    def advance(self, s):
        self.t += s


class FakeEvent:
    """A device event stamped with the fake device clock, which a test moves behind the host's (a GPU's queue
    runs behind the host that fills it)."""

    def __init__(self, device_clock):
        self.device_clock = device_clock

    def record(self):
        self.t = self.device_clock()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1000.0


def run_steps(prof, clock, n, data=1.0, compute=2.0, other=0.5):
    for _ in range(n):
        prof.data_start()
        clock.advance(data)
        prof.compute_start()
        clock.advance(compute)
        prof.step_end()
        clock.advance(other)  # logging, scheduler: inside p_train's window, outside p_core's


def test_windows_give_flagperf_metrics_and_the_invariant():
    clock = FakeClock()
    prof = StepTimer(global_batch=8, world_size=2, warmup_steps=0, clock=clock)
    prof.train_start()
    run_steps(prof, clock, 4)
    with prof.pause("eval"):
        clock.advance(10.0)
    run_steps(prof, clock, 4)
    with prof.pause("checkpoint"):
        clock.advance(3.0)
    prof.train_end()
    s = prof.summary()
    samples = 8 * 8
    assert s["train_samples"] == samples
    assert s["train_time"] == pytest.approx(8 * 3.5 + 13.0)
    assert s["eval_time"] == pytest.approx(10.0) and s["checkpoint_time_in_train_window"] == pytest.approx(3.0)
    assert s["p_whole"] == pytest.approx(samples / (8 * 3.5 + 13.0))
    assert s["p_train"] == pytest.approx(samples / (8 * 3.5))
    assert s["p_core"] == pytest.approx(samples / (8 * 2.0))
    assert s["data_wait_time"] == pytest.approx(8.0)
    assert s["p_core"] >= s["p_train"] >= s["p_whole"]
    assert (s["p_whole_steady"], s["p_train_steady"], s["p_core_steady"]) == (s["p_whole"], s["p_train"], s["p_core"])


def test_warmup_steps_are_left_out_of_steady_figures_only():
    clock = FakeClock()
    prof = StepTimer(global_batch=4, world_size=1, warmup_steps=2, clock=clock)
    prof.train_start()
    run_steps(prof, clock, 2, data=5.0, compute=20.0, other=0.0)  # slow first steps (compile, warm-up)
    run_steps(prof, clock, 6, data=1.0, compute=2.0, other=0.0)
    prof.train_end()
    s = prof.summary()
    assert s["p_core_steady"] == pytest.approx(6 * 4 / (6 * 2.0))
    assert s["p_train_steady"] == pytest.approx(6 * 4 / (6 * 3.0))
    assert s["p_core"] == pytest.approx(8 * 4 / (2 * 20.0 + 6 * 2.0))  # plain figures count every step
    assert s["p_core_steady"] > s["p_core"]


def test_device_events_time_compute_and_window_edges_synchronize():
    """An async device: the host runs ahead; the compute windows come from events, and pauses and the
    train end wait for the device (sync) so queued work is charged to training."""
    host = FakeClock()
    device_clock = FakeClock()
    synced = []

    def sync():  # the host waits until the device has finished what was queued
        synced.append(host.t)
        host.t = max(host.t, device_clock.t)

    prof = StepTimer(global_batch=2, world_size=1, warmup_steps=0, clock=host, synchronize=sync,
                        make_event=lambda: FakeEvent(device_clock))
    prof.train_start()
    for _ in range(3):
        prof.data_start()
        host.advance(0.1)
        device_clock.t = max(device_clock.t, host.t)
        prof.compute_start()
        device_clock.advance(4.0)  # the device works 4 s per step...
        host.advance(0.01)  # ...while the host only queues launches
        prof.step_end()
    n_sync = len(synced)
    with prof.pause("eval"):
        pass
    assert len(synced) > n_sync, "a pause must synchronize first"
    prof.train_end()
    s = prof.summary()
    assert s["compute_time"] == pytest.approx(12.0)  # from events, not the 0.03 s of host time
    assert s["p_core"] >= s["p_train"] >= s["p_whole"]


class OtherRank:
    """Stands for the all-reduce (MAX over ranks): the other rank's figures are this rank's x `factor`."""

    def __init__(self, factor: float):
        self.factor, self.calls = factor, []

    def __call__(self, values):
        self.calls.append(list(values))
        return [max(v, v * self.factor) for v in values]


def test_interval_rows_leave_pauses_out_and_take_the_slowest_rank():
    clock = FakeClock()
    reduce_max = OtherRank(1.0)
    slow_data = lambda values: [values[0] * 3, *values[1:]]  # noqa: E731  another rank waited 3x on data
    prof = StepTimer(global_batch=10, world_size=2, warmup_steps=0, clock=clock,
                        reduce_max=lambda v: slow_data(reduce_max(v)),
                        memory_probe=lambda: {M.MEM_HOST_RSS: 1.5})
    prof.train_start()
    run_steps(prof, clock, 5, data=1.0, compute=3.0, other=0.0)
    with prof.pause("eval"):
        clock.advance(100.0)
    row = prof.interval_row()
    # One all-reduce per row carries this rank's figures: data wait, compute, wall (pause left out), memory.
    # (compute and data wait negated too: their minimum over ranks, in the same all-reduce)
    assert reduce_max.calls == [[5.0, 15.0, 20.0, 1.5, -5.0, -15.0]]
    assert row[M.THROUGHPUT] == pytest.approx(50 / 20.0)
    assert row[M.THROUGHPUT_PER_DEVICE] == pytest.approx(50 / 20.0 / 2)
    assert row[M.STEP_TIME] == pytest.approx(4.0)
    assert row[M.DATA_WAIT] == pytest.approx(3.0)
    assert row[M.DATA_WAIT_PCT] == pytest.approx(100 * 15.0 / 20.0)
    assert row[M.DATA_WAIT_FASTEST] == pytest.approx(1.0) and row[M.COMPUTE_TIME_FASTEST] == pytest.approx(3.0)
    assert row[M.MEM_HOST_RSS] == 1.5
    run_steps(prof, clock, 2, data=0.0, compute=1.0, other=0.0)
    assert prof.interval_row()[M.STEP_TIME] == pytest.approx(1.0)  # only steps since the previous row


def test_summary_takes_every_window_from_the_slowest_rank_pauses_included():
    """eval_time and checkpoint_time are reduced like every other window: the other rank's are 2x ours."""
    clock = FakeClock()
    prof = StepTimer(global_batch=4, world_size=2, warmup_steps=0, clock=clock, reduce_max=OtherRank(2.0),
                        memory_probe=lambda: {M.MEM_HOST_PEAK_RSS: 1.0})
    prof.train_start()
    run_steps(prof, clock, 3, data=1.0, compute=2.0, other=0.0)
    with prof.pause("eval"):
        clock.advance(5.0)
    with prof.pause("checkpoint"):
        clock.advance(1.0)
    prof.train_end()
    s = prof.summary()
    assert s["eval_time"] == pytest.approx(10.0) and s["checkpoint_time_in_train_window"] == pytest.approx(2.0)
    assert s["train_time"] == pytest.approx(2 * (9.0 + 6.0))
    assert s["compute_time"] == pytest.approx(12.0) and s["data_wait_time"] == pytest.approx(6.0)
    assert s["compute_time_fastest_rank"] == pytest.approx(6.0) and s["data_wait_time_fastest_rank"] == 3.0
    assert s["p_train"] == pytest.approx(12 / (2 * 9.0))
    assert s["mem_used_gib"] == 2.0


def test_resumed_launch_counts_only_its_own_steps():
    """A resumed run's profiler starts empty: its throughput is this launch's samples over this launch's time."""
    clock = FakeClock()
    prof = StepTimer(global_batch=4, world_size=1, warmup_steps=0, clock=clock)
    clock.advance(500.0)  # restoring the checkpoint happens before train start
    prof.train_start()
    run_steps(prof, clock, 3, data=0.0, compute=1.0, other=0.0)
    prof.train_end()
    s = prof.summary()
    assert s["train_samples"] == 12 and s["p_whole"] == pytest.approx(4.0)


def test_mfu_uses_flops_and_the_device_peak():
    clock = FakeClock()
    prof = StepTimer(global_batch=100, world_size=4, warmup_steps=0, clock=clock, flops_per_sample=1e12,
                        peak_tflops_per_device=50.0)
    prof.train_start()
    run_steps(prof, clock, 2, data=0.0, compute=1.0, other=0.0)
    row = prof.interval_row()
    assert row[M.TFLOPS_PER_DEVICE] == pytest.approx(100 * 1e12 / 1.0 / 4 / 1e12)
    assert row[M.MFU] == pytest.approx(100 * 25.0 / 50.0)
    run_steps(prof, clock, 2, data=0.0, compute=2.0, other=0.0)  # slower steps after the first row
    prof.train_end()
    s = prof.summary()
    assert s["mfu_core(%)"] == pytest.approx(100 * (1e12 * 400 / 6.0 / 4 / 1e12) / 50.0)
    assert s["mfu_train(%)"] == pytest.approx(s["mfu_core(%)"])  # no data wait, nothing else in the window


def test_steady_mfu_leaves_the_warmup_steps_out():
    clock = FakeClock()
    prof = StepTimer(global_batch=100, world_size=1, warmup_steps=2, clock=clock, flops_per_sample=1e12,
                        peak_tflops_per_device=1000.0)
    prof.train_start()
    run_steps(prof, clock, 2, data=0.0, compute=10.0, other=0.0)  # warm-up: compilation, allocator growth
    run_steps(prof, clock, 3, data=1.0, compute=1.0, other=0.0)
    prof.train_end()
    s = prof.summary()
    assert s["mfu_core_steady(%)"] == pytest.approx(100 * (100 / 1.0) / 1000.0)
    assert s["mfu_train_steady(%)"] == pytest.approx(100 * (100 / 2.0) / 1000.0)
    assert s["mfu_core(%)"] < s["mfu_core_steady(%)"]
    # the first step's cost beyond a steady one: with --compile, the compile time
    assert s["first_step_s"] == pytest.approx(10.0) and s["first_step_extra_s"] == pytest.approx(9.0)


def test_peak_table_carries_its_source():
    def peak(name, label):
        return peak_tflops(name, SPECS[label].peak_class)

    assert peak("NVIDIA A100-SXM4-40GB", "amp")[0] == 312.0
    assert peak("NVIDIA A100-SXM4-40GB", "fp32") == (19.5, "NVIDIA A100 datasheet, dense")
    assert peak("NVIDIA H100 PCIe", "bf16") == (756.0, "NVIDIA H100 datasheet, PCIe, dense")
    assert peak("NVIDIA H200", "tf32")[0] == 494.7 and "H200" in peak("NVIDIA H200", "tf32")[1]
    assert peak("NVIDIA H200 NVL", "bf16") == (835.5, "NVIDIA H200 NVL datasheet, dense")  # not the SXM row
    assert peak("NVIDIA H100 NVL", "fp16")[0] == 835.5
    assert peak(None, "fp32") == (None, None)  # CPUs: no MFU rather than an invented peak
    assert peak("AMD Instinct MI300X", "bf16") == (1307.4, "AMD Instinct MI300X datasheet, dense")
    assert peak("AMD Instinct MI355X", "amp")[0] == 2516.6 and peak("AMD Instinct MI355X", "tf32") == (None, None)
    assert peak("NVIDIA B200", "bf16")[0] == 2250.0 and peak("NVIDIA GB200", "bf16")[0] == 2500.0  # GB200 first
    assert peak("GAUDI3", "bf16")[0] == 1835.0 and peak("GAUDI3", "fp32") == (None, None)
    assert peak("NVIDIA H20", "bf16")[0] == 148.0
    assert peak("Intel(R) Xeon(R) Platinum 8480+", "bf16") == (None, None)  # an unknown part: nobody's peak
    for _, peaks, source in PEAK_TFLOPS:  # every row cites its source and names every class
        assert source and set(peaks) == {"fp32", "tf32", "16bit", "fp8"}


def test_flop_counter_matches_vit_arithmetic():
    """Forward of a ViT = 2 x MACs of its matmuls (patch embed, qkv, attention, projection, MLP, head);
    training = 3 x forward, less the input gradient of the patch embedding (images need none)."""
    import timm

    depth, dim, mlp, img, patch, classes = 2, 192, 768, 32, 8, 10
    tokens = (img // patch) ** 2 + 1
    embed_macs = (img // patch) ** 2 * (3 * patch * patch) * dim
    macs = embed_macs + depth * (tokens * 4 * dim * dim + 2 * tokens * tokens * dim + 2 * tokens * dim * mlp)
    macs += dim * classes
    flops = train_flops_per_sample(lambda: timm.create_model("vit_tiny_patch16_224", img_size=img, patch_size=patch,
                                                             depth=depth, num_classes=classes), img)
    assert flops == pytest.approx(3 * 2 * macs - 2 * embed_macs, rel=0.001)


def test_steady_step_times_are_kept_and_give_each_figure_its_spread():
    clock = FakeClock()
    prof = StepTimer(global_batch=8, world_size=1, warmup_steps=2, clock=clock)
    prof.train_start()
    run_steps(prof, clock, 2, data=0.0, compute=5.0, other=0.0)
    run_steps(prof, clock, 10, data=0.5, compute=1.0, other=0.0)
    with prof.pause("eval"):
        clock.t += 3.0
    prof.train_end()
    s = prof.summary()
    times = s["step_times"]
    assert times["first_step"] == 3 and len(times["compute_s"]) == len(times["train_s"]) == 10
    assert times["compute_s"] == [pytest.approx(1.0)] * 10 and times["train_s"] == [pytest.approx(1.5)] * 10
    assert s["spread"]["p_core_steady"]["mean"] == pytest.approx(s["p_core_steady"]) == pytest.approx(8.0)
    assert s["spread"]["p_train_steady"]["median"] == pytest.approx(8 / 1.5)
    assert s["spread"]["p_whole_steady"]["mean"] == pytest.approx(s["p_whole_steady"])  # pauses spread over steps
