"""Peak dense (no sparsity) TFLOP/s of one device by precision class, each row with its source: what MFU divides
by. Only a device named here gets an MFU; any other gets none and one start-up warning naming --peak-tflops,
never another device's peak (an unknown device counted as an A100 is how MFUs of 200-563% were reported:
torchtitan#1201, Primus#772).

Classes: "fp32" (fp32 matmuls: the matrix-unit rate where the part has one), "tf32", "16bit" (fp16/bf16) and
"fp8". None: the part has no such rate. A row is one PyTorch device: an MI250X module is two devices (GCDs),
a Max 1550 card two tiles. Rows are matched by a fragment of the device's product name, in this order (the NVL
and PCIe rows before the SXM row of the same chip).
"""

from __future__ import annotations

_HOPPER_SXM = {"fp32": 67.0, "tf32": 494.7, "16bit": 989.4, "fp8": 1978.9}
_HOPPER_NVL = {"fp32": 60.0, "tf32": 417.5, "16bit": 835.5, "fp8": 1670.5}  # half the datasheet's sparse figures
_MI300 = {"fp32": 163.4, "tf32": 653.7, "16bit": 1307.4, "fp8": 2614.9}

PEAK_TFLOPS = [
    # NVIDIA (datasheets; Hopper and Blackwell sheets quote "with sparsity": dense is half)
    ("GB200", {"fp32": 80.0, "tf32": 1250.0, "16bit": 2500.0, "fp8": 5000.0},
     "NVIDIA GB200 NVL72 datasheet, per GPU, dense"),
    ("B200", {"fp32": 75.0, "tf32": 1125.0, "16bit": 2250.0, "fp8": 4500.0}, "NVIDIA HGX B200 datasheet, per GPU, dense"),
    ("H200 NVL", _HOPPER_NVL, "NVIDIA H200 NVL datasheet, dense"),
    ("H100 NVL", _HOPPER_NVL, "NVIDIA H100 NVL datasheet, dense"),
    ("H200", _HOPPER_SXM, "NVIDIA H100/H200 datasheet, SXM, dense"),
    ("H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "16bit": 756.0, "fp8": 1513.0}, "NVIDIA H100 datasheet, PCIe, dense"),
    ("H100", _HOPPER_SXM, "NVIDIA H100/H200 datasheet, SXM, dense"),
    ("H800", _HOPPER_SXM, "NVIDIA H800 datasheet, SXM, dense"),
    ("H20", {"fp32": 44.0, "tf32": 74.0, "16bit": 148.0, "fp8": 296.0}, "NVIDIA H20 datasheet, dense"),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "16bit": 312.0, "fp8": None}, "NVIDIA A100 datasheet, dense"),
    ("A800", {"fp32": 19.5, "tf32": 156.0, "16bit": 312.0, "fp8": None}, "NVIDIA A800 datasheet, dense"),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "16bit": 362.0, "fp8": 733.0}, "NVIDIA L40S datasheet, dense"),
    ("V100", {"fp32": 15.7, "tf32": 15.7, "16bit": 125.0, "fp8": None},
     "NVIDIA V100 datasheet, SXM2 (no TF32: fp32 rate)"),
    # AMD (Instinct datasheets, matrix-core peaks; ROCm's torch names them "AMD Instinct MI...")
    ("MI355X", {"fp32": 157.3, "tf32": None, "16bit": 2516.6, "fp8": 5033.2},
     "AMD Instinct MI355X datasheet, dense (CDNA 4 has no TF32 units)"),
    ("MI325X", _MI300, "AMD Instinct MI325X datasheet, dense"),
    ("MI300X", _MI300, "AMD Instinct MI300X datasheet, dense"),
    ("MI250X", {"fp32": 47.9, "tf32": None, "16bit": 191.5, "fp8": None},
     "AMD Instinct MI250X datasheet, matrix, per GCD (one PyTorch device; the module is two)"),
    # Intel
    ("GAUDI3", {"fp32": None, "tf32": None, "16bit": 1835.0, "fp8": 1835.0},
     "Intel Gaudi 3 spec (Hot Chips 2024), MME matrix peak"),
    ("GAUDI2", {"fp32": None, "tf32": None, "16bit": 432.0, "fp8": None}, "Intel Gaudi 2 spec, MME BF16 matrix peak"),
    ("Data Center GPU Max 1550", {"fp32": None, "tf32": None, "16bit": 340.8, "fp8": None},
     "Intel oneAPI GPU optimization guide: DPAS 512 ops/clock x 512 units x 1.3 GHz, per tile (one device)"),
]


def peak_tflops(device_name: str | None, peak_class: str) -> tuple[float | None, str | None]:
    """(peak dense TFLOP/s of one device for PEAK_CLASS, a precision's `peak_class`; its source), or (None, None)
    where the device, or its rate for that class, is not in the table (no MFU rather than an invented peak)."""
    for fragment, peaks, source in PEAK_TFLOPS if device_name else []:
        if fragment.lower() in device_name.lower():
            return (peaks.get(peak_class), source) if peaks.get(peak_class) else (None, None)
    return None, None
