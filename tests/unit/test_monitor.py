"""The hardware monitor: energy arithmetic on recorded sequences (a wrapping counter included), the sampler on
this machine (whatever sensors it has: absent ones recorded with a reason, never as 0), and NVML's reading
through a stand-in module (no GPU here; the device script checks the real one). In-process, under a second."""

import sys
import time
import types

import pytest

from vitbench import metrics as M
from vitbench import monitor
from vitbench.device import Device


def test_counter_energy_sums_increases_and_unwraps_a_counter():
    samples = [(0.0, 90.0), (1.0, 95.0), (2.0, 2.0), (3.0, 7.0), (4.0, 12.0)]  # wraps at 100 J after t=1
    assert monitor.counter_energy_j(samples, 0.0, 4.0, wrap=100.0) == pytest.approx(5 + 7 + 5 + 5)
    assert monitor.counter_energy_j(samples, 0.0, 4.0) is None  # went back with no known range: no figure
    steady = [(float(t), 50.0 * t) for t in range(1, 10)]  # 50 W, sampled inside the window
    assert monitor.counter_energy_j(steady, 0.0, 10.0) == pytest.approx(500.0)  # edges at the mean rate


def test_power_integral_over_the_window():
    samples = [(float(t), 100.0) for t in range(1, 10)]
    assert monitor.power_energy_j(samples, 0.0, 10.0) == pytest.approx(1000.0)
    ramp = [(0.0, 0.0), (2.0, 200.0)]
    assert monitor.power_energy_j(ramp, 0.0, 2.0) == pytest.approx(200.0)
    assert monitor.power_energy_j([], 0.0, 1.0) is None


def test_the_monitor_samples_here_and_records_absent_sensors_with_a_reason():
    sensors, status = monitor.probe_sensors(Device(), 0)
    hw = monitor.HardwareMonitor(sensors, status, interval_s=0.05).start()
    time.sleep(0.3)
    hw.stop()
    assert len(hw.samples) >= 3 and all("host_cpu_pct" in r for _, r in hw.samples)
    assert M.UTIL_HOST_CPU in hw.latest_row()
    t0, t1 = hw.samples[0][0], hw.samples[-1][0]
    summary = hw.summary(t0, t1)
    for name, s in summary["sensors"].items():
        assert s["available"] or s["reason"], name
    has_energy = any(s.get("available") for n, s in summary["sensors"].items() if n != "host_cpu")
    if not has_energy:  # this machine's CPU exposes no power sensor: absent, never 0
        assert summary["energy_j"] is None and summary["power_avg_w"] is None
        assert M.POWER not in hw.latest_row()
    else:
        assert summary["energy_j"] is not None and summary["energy_j"] >= 0


@pytest.fixture
def fake_nvml(monkeypatch):
    """A stand-in for NVML (no NVIDIA GPU here): 300 W, a counter rising 300 J/s, 65 C."""
    start = time.perf_counter()
    nvml = types.SimpleNamespace(
        NVMLError=RuntimeError, NVML_TEMPERATURE_GPU=0, NVML_CLOCK_SM=1, nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: ("gpu", i), nvmlDeviceGetHandleByUUID=lambda u: ("gpu", u),
        nvmlDeviceGetPowerUsage=lambda h: 300_000, nvmlDeviceGetTemperature=lambda h, kind: 65,
        nvmlDeviceGetTotalEnergyConsumption=lambda h: int(1e6 + 300_000 * (time.perf_counter() - start)),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=97),
        nvmlDeviceGetClockInfo=lambda h, kind: 1980, nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=2**34))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    return nvml


def test_nvml_readings_become_watts_joules_and_the_window_energy(fake_nvml):
    sensor = monitor._Nvml(local_index=1)
    assert sensor.handle == ("gpu", 5)  # the rank's device through CUDA_VISIBLE_DEVICES
    hw = monitor.HardwareMonitor([sensor], {"nvml": {"available": True}}, interval_s=0.02).start()
    time.sleep(0.25)
    hw.stop()
    t0, t1 = hw.samples[0][0], hw.samples[-1][0]
    s = hw.summary(t0, t1)
    assert s["energy_source"] == "energy counter"
    assert s["energy_j"] == pytest.approx(300.0 * (t1 - t0), rel=0.05)  # energy = mean power x time within 5%
    assert s["power_peak_w"] == 300.0 and s["temp_peak_c"] == 65.0 and s["power_avg_w"] == pytest.approx(300, rel=0.05)
    row = hw.latest_row()
    assert row[M.POWER] == 300.0 and row[M.TEMP] == 65.0 and row[M.UTIL_DEVICE] == 97.0 and row[M.CLOCK_SM] == 1980.0
    combined = monitor.combine([s, s], train_samples=1000, interval_s=0.02)
    assert combined["energy_j"] == pytest.approx(2 * s["energy_j"])
    assert combined["img_per_joule"] == pytest.approx(1000 / combined["energy_j"])
    assert combined["img_per_joule_per_device"] == [pytest.approx(500 / s["energy_j"])] * 2


def test_runs_without_energy_combine_to_none_not_zero():
    absent = {"energy_j": None, "energy_source": None, "power_avg_w": None, "power_peak_w": None,
              "temp_peak_c": None, "samples": 4, "sensors": {"rapl": {"available": False, "reason": "none"}}}
    combined = monitor.combine([absent], train_samples=64, interval_s=1.0)
    assert combined["energy_j"] is None and combined["img_per_joule"] is None
    assert combined["img_per_joule_per_device"] == [None]
