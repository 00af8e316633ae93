"""The hardware monitor beside the step profiler: a background thread samples, every `interval_s` (default 1 s),
each sensor this rank's machine has — NVML on NVIDIA GPUs (power, the total-energy counter, temperature,
utilisation, SM clock, memory used), amdsmi on AMD GPUs where it is installed, RAPL's energy counter on CPUs
where the kernel exposes /sys/class/powercap, and the host CPU's utilisation everywhere. Off the hot path: the
thread never touches the device's queue (no synchronization), and the loop reads only its last sample.

A sensor the machine lacks is recorded as absent with the reason (`sensors`), never as 0. Energy over the train
window is the energy counter's difference where the device has one (a counter that wraps is unwrapped), else the
integral of power; `img_per_joule` = trained samples / the joules of every device (results.json; the report shows
it beside p_whole / p_train / p_core).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from vitbench import metrics as M

DEFAULT_INTERVAL_S = 1.0
RAPL = Path("/sys/class/powercap")


# ---- the arithmetic (pure, tested on recorded sequences) ---------------------------------------------------------
def counter_energy_j(samples: list[tuple[float, float]], t0: float, t1: float, wrap: float | None = None) -> float | None:
    """Joules from an energy counter's (time, joules) SAMPLES over [t0, t1]: the sum of its increases, a decrease
    counted as a wrap at WRAP (the counter's range), linearly interpolated at the window's edges."""
    inside = [(t, e) for t, e in samples if t0 <= t <= t1]
    if len(inside) < 2:
        return None
    total = 0.0
    for (_, a), (_, b) in zip(inside, inside[1:]):
        step = b - a
        if step < 0:
            if wrap is None:
                return None  # a counter that went back without a known range: no figure rather than a wrong one
            step += wrap
        total += step
    (ta, _), (tb, _) = inside[0], inside[-1]
    rate = total / (tb - ta) if tb > ta else 0.0
    return total + rate * ((ta - t0) + (t1 - tb))  # the edges at the window's mean rate


def power_energy_j(samples: list[tuple[float, float]], t0: float, t1: float) -> float | None:
    """Joules from (time, watts) SAMPLES over [t0, t1]: the trapezoid integral, held flat to the window's edges."""
    inside = [(t, w) for t, w in samples if t0 <= t <= t1]
    if not inside:
        return None
    total = sum((tb - ta) * (wa + wb) / 2 for (ta, wa), (tb, wb) in zip(inside, inside[1:]))
    return total + inside[0][1] * (inside[0][0] - t0) + inside[-1][1] * (t1 - inside[-1][0])


# ---- sensors -----------------------------------------------------------------------------------------------------
class _Nvml:
    name = "nvml"

    def __init__(self, local_index: int):
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        spec = visible[local_index] if local_index < len(visible) else str(local_index)
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(spec)) if spec.isdigit() else \
            pynvml.nvmlDeviceGetHandleByUUID(spec)
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.has_energy = True
        except pynvml.NVMLError:  # before Volta
            self.has_energy = False

    def read(self) -> dict:
        n, h = self.nvml, self.handle
        out = {"power_w": n.nvmlDeviceGetPowerUsage(h) / 1000.0,
               "temp_c": float(n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
               "util_pct": float(n.nvmlDeviceGetUtilizationRates(h).gpu),
               "clock_mhz": float(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
               "mem_used_gib": n.nvmlDeviceGetMemoryInfo(h).used / M.GIB}
        if self.has_energy:
            out["energy_j"] = n.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0  # mJ since the driver loaded
        return out


class _AmdSmi:
    name = "amdsmi"

    def __init__(self, local_index: int):
        import amdsmi

        amdsmi.amdsmi_init()
        self.smi, self.handle = amdsmi, amdsmi.amdsmi_get_processor_handles()[local_index]

    def read(self) -> dict:
        s, h = self.smi, self.handle
        power = s.amdsmi_get_power_info(h)
        out = {"power_w": float(power.get("current_socket_power") or power.get("average_socket_power") or 0) or None,
               "temp_c": float(s.amdsmi_get_temp_metric(h, s.AmdSmiTemperatureType.EDGE,
                                                         s.AmdSmiTemperatureMetric.CURRENT)),
               "util_pct": float(s.amdsmi_get_gpu_activity(h)["gfx_activity"])}
        energy = s.amdsmi_get_energy_count(h)
        out["energy_j"] = energy["energy_accumulator"] * energy["counter_resolution"] / 1e6  # microjoules
        return {k: v for k, v in out.items() if v is not None}


class _Rapl:
    """The CPU package's energy counter (Intel RAPL, AMD on recent kernels): microjoules, wrapping at its range."""

    name = "rapl"

    def __init__(self):
        zones = sorted(RAPL.glob("intel-rapl:[0-9]*")) if RAPL.is_dir() else []
        zones = [z for z in zones if (z / "energy_uj").is_file() and os.access(z / "energy_uj", os.R_OK)]
        if not zones:
            raise OSError(f"no readable RAPL zone under {RAPL}")
        self.zones = zones
        self.wrap = sum(int((z / "max_energy_range_uj").read_text()) for z in zones) / 1e6

    def read(self) -> dict:
        return {"energy_j": sum(int((z / "energy_uj").read_text()) for z in self.zones) / 1e6}


def probe_sensors(device_layer, local_index: int) -> tuple[list, dict]:
    """The sensors this rank can read, and {name: {"available": bool, "reason": ...}} for each kind tried."""
    sensors, status = [], {}
    tries = []
    if device_layer.kind == "cuda":
        tries += [("nvml", lambda: _Nvml(local_index)), ("amdsmi", lambda: _AmdSmi(local_index))]
    if device_layer.host_memory:
        tries.append(("rapl", _Rapl))
    for name, make in tries:
        try:
            sensors.append(make())
            status[name] = {"available": True}
        except Exception as e:  # no library, no driver, no device, no permission: each says so in its own type
            status[name] = {"available": False, "reason": f"{type(e).__name__}: {str(e)[:160] or 'unavailable'}"}
    if not tries:
        status["device"] = {"available": False, "reason": f"no power sensor is known for '{device_layer.kind}' "
                                                          "devices (NVML, amdsmi and RAPL are read)"}
    status["host_cpu"] = {"available": True}
    return sensors, status


class HardwareMonitor:
    """Samples SENSORS (probe_sensors) every INTERVAL_S in a daemon thread until `stop()`; CLOCK: the step
    profiler's clock, so its train window selects the samples."""

    def __init__(self, sensors: list, status: dict, interval_s: float = DEFAULT_INTERVAL_S,
                 clock=time.perf_counter):
        import psutil

        self.sensors, self.status, self.interval_s, self.clock = sensors, status, interval_s, clock
        self.samples: list[tuple[float, dict]] = []
        self._psutil, self._stop = psutil, threading.Event()
        psutil.cpu_percent(None)  # the first call starts psutil's interval
        self._thread = threading.Thread(target=self._run, name="vitbench-hw-monitor", daemon=True)

    def start(self) -> "HardwareMonitor":
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        reading = {"host_cpu_pct": self._psutil.cpu_percent(None)}
        for sensor in self.sensors:
            try:
                reading.update(sensor.read())
            except Exception as e:  # a sensor that fails mid-run stops being read, and says why
                self.sensors = [s for s in self.sensors if s is not sensor]
                self.status[sensor.name] = {"available": False, "reason": f"failed while running: {e}"[:200]}
        self.samples.append((self.clock(), reading))

    def latest_row(self) -> dict:
        """The last sample in the metric names (metrics.jsonl / W&B); only what was measured."""
        if not self.samples:
            return {}
        r = self.samples[-1][1]
        names = {"power_w": M.POWER, "temp_c": M.TEMP, "util_pct": M.UTIL_DEVICE, "clock_mhz": M.CLOCK_SM,
                 "host_cpu_pct": M.UTIL_HOST_CPU}
        return {names[k]: v for k, v in r.items() if k in names}

    def summary(self, t0: float, t1: float) -> dict:
        """This rank's device over the train window [t0, t1]: energy (J) and how it was measured, average and
        peak power (W), peak temperature (C); each None where no sensor gave it."""
        def series(key):
            return [(t, r[key]) for t, r in self.samples if key in r]
        energy, source = None, None
        if series("energy_j"):
            wrap = next((s.wrap for s in self.sensors if isinstance(s, _Rapl)), None)
            energy, source = counter_energy_j(series("energy_j"), t0, t1, wrap), "energy counter"
        if energy is None and series("power_w"):
            energy, source = power_energy_j(series("power_w"), t0, t1), "integral of power samples"
        watts = [w for t, w in series("power_w") if t0 <= t <= t1]
        temps = [c for t, c in series("temp_c") if t0 <= t <= t1]
        return {"energy_j": energy, "energy_source": source,
                "power_avg_w": energy / (t1 - t0) if energy is not None and t1 > t0 else None,
                "power_peak_w": max(watts) if watts else None, "temp_peak_c": max(temps) if temps else None,
                "samples": sum(1 for t, _ in self.samples if t0 <= t <= t1), "sensors": self.status}


def combine(per_rank: list[dict], train_samples: int, interval_s: float) -> dict:
    """results.json's power fields from every rank's `summary` (one device each): totals over devices."""
    energies = [r["energy_j"] for r in per_rank]
    total = sum(energies) if energies and all(e is not None for e in energies) else None
    return {
        "energy_j": total, "energy_j_per_device": energies,
        "energy_source": per_rank[0]["energy_source"] if per_rank else None,
        "power_avg_w_per_device": [r["power_avg_w"] for r in per_rank],
        "power_peak_w_per_device": [r["power_peak_w"] for r in per_rank],
        "temp_peak_c_per_device": [r["temp_peak_c"] for r in per_rank],
        "img_per_joule": train_samples / total if total else None,
        # each device trains an equal share of the samples
        "img_per_joule_per_device": [train_samples / len(per_rank) / e if e else None for e in energies],
        "hw_monitor": {"interval_s": interval_s, "samples": [r["samples"] for r in per_rank],
                       "sensors": per_rank[0]["sensors"] if per_rank else {}},
    }
