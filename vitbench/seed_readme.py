"""The seed's whole README — FlagPerf's `training/<vendor>/vit-pytorch/README.md` — written from one vendor's run
files instead of by hand: 硬件环境 (hardware), 软件环境 (software), 通用指标 (the metric definitions) and 性能指标
(the figures, vitbench.reporting's table). Every field comes from results.json (what the run probed) or from the
vendor profile it ran with (what a run cannot probe: the machine's model, the network, the container); a field
neither has is "/" (the seed's placeholder), never a guess.
"""

from __future__ import annotations

from vitbench.reporting import ResultsError, device_short_name, markdown_table
from vitbench.vendor import hardware_for

HEADINGS = {
    "zh": {"title": "### {vendor}配置与运行信息参考", "env": "#### 环境配置", "hw": "- ##### 硬件环境",
           "sw": "- ##### 软件环境", "run": "### 运行情况", "general": "* 通用指标", "perf": "* 性能指标"},
    "en": {"title": "### {vendor}: configuration and run information", "env": "#### Environment",
           "hw": "- ##### Hardware", "sw": "- ##### Software", "run": "### Results", "general": "* General metrics",
           "perf": "* Performance metrics"},
}
HARDWARE = {"zh": ["机器型号", "加速卡型号", "CPU型号", "多机网络类型、带宽"],
            "en": ["Machine", "Accelerator", "CPU", "Multi-node network, bandwidth"]}
SOFTWARE = {"zh": ["OS版本", "OS kernel版本", "加速卡驱动版本", "Docker 版本", "训练框架版本", "依赖软件版本"],
            "en": ["OS", "OS kernel", "Accelerator driver", "Docker", "Training framework", "Dependencies"]}
# 通用指标: (name, value, note) per row, as the seed's; {…} filled from the runs.
GENERAL = {
    "zh": [("指标名称", "指标值", "特殊说明"),
           ("任务类别", "Image Classification", ""),
           ("模型", "Vision Transformer", "{model}"),
           ("数据集", "{dataset}", ""),
           ("数据精度", "precision,见“性能指标”", "可选fp32/tf32/amp/fp16/bf16(实际生效的精度见results.json)"),
           ("超参修改", "fix_hp,见“性能指标”", "跑满硬件设备评测吞吐量所需特殊超参(厂商配置{profile})"),
           ("硬件设备简称", "{vendor}", ""),
           ("硬件存储使用", "mem,见“性能指标”", "通常称为“显存”,单位为GiB(已用/总量)"),
           ("端到端时间", "e2e_time,见“性能指标”", "总时间+Perf初始化等时间,单位为秒"),
           ("总吞吐量", "p_whole,见“性能指标”", "实际训练样本数除以总时间(performance_whole),单位为img/s"),
           ("训练吞吐量", "p_train,见“性能指标”", "不包含每个epoch末尾的评估部分耗时"),
           ("**计算吞吐量**", "**p_core,见“性能指标”**", "不包含数据IO部分的耗时(p3>p2>p1),设备事件计时"),
           ("训练结果", "final_acc1,见“性能指标”", "验证集top-1准确率(%),每个样本恰好一次"),
           ("额外修改项", "{changes}", "")],
    "en": [("Metric", "Value", "Note"),
           ("Task", "Image Classification", ""),
           ("Model", "Vision Transformer", "{model}"),
           ("Dataset", "{dataset}", ""),
           ("Precision", "precision, see Performance", "fp32/tf32/amp/fp16/bf16 (what ran: results.json)"),
           ("Hyper-parameter changes", "fix_hp, see Performance",
            "hardware-bound settings needed to saturate the device (vendor profile {profile})"),
           ("Device", "{vendor}", ""),
           ("Device memory", "mem, see Performance", "GiB used/total"),
           ("End-to-end time", "e2e_time, see Performance", "the whole job, initialisation included, s"),
           ("Whole throughput", "p_whole, see Performance", "trained samples / train time (performance_whole), img/s"),
           ("Train throughput", "p_train, see Performance", "without the evaluations"),
           ("**Compute throughput**", "**p_core, see Performance**",
            "without data loading (p3>p2>p1), device-event timed"),
           ("Result", "final_acc1, see Performance", "validation top-1 (%), every sample once"),
           ("Other changes", "{changes}", "")],
}
NONE = {"zh": "无", "en": "none"}


def write(results: list[dict], lang: str = "zh") -> str:
    """The seed's README for RESULTS, the runs of one vendor profile (its 1x1, 1x8, 2x8 rows)."""
    if not results:
        raise ResultsError("no runs for --vendor-readme")
    vendors = {((r.get("plan") or {}).get("vendor") or {}).get("name") for r in results}
    if len(vendors) != 1 or None in vendors:
        raise ResultsError(f"--vendor-readme needs runs of one vendor profile (--vendor NAME), these have "
                           f"{sorted(map(str, vendors))}")
    first = results[0]
    env, profile = first.get("environment") or {}, first["plan"]["vendor"]
    device = device_short_name(env)
    hardware = hardware_for(profile.get("hardware") or {}, env.get("device_name") or "")
    h = HEADINGS[lang]
    kind = "GPU" if env.get("device_type") == "cuda" else (env.get("device_type") or "").upper()
    lines = [h["title"].format(vendor=_label(profile["name"].capitalize(), kind)), h["env"], h["hw"]]
    lines += [f"    - {k}: {v}" for k, v in zip(HARDWARE[lang], _hardware_values(results, hardware, lang))]
    lines.append(h["sw"])
    lines += [f"   - {k}：{v}" if lang == "zh" else f"   - {k}: {v}"
              for k, v in zip(SOFTWARE[lang], _software_values(env, profile.get("software") or {}, lang))]
    lines += ["", "", h["run"], h["general"], ""]
    fill = {"model": first["plan"].get("model", ""), "dataset": _dataset(first, lang),
            "vendor": _label(profile["name"], device), "profile": f"{profile['name']}, sha256 {profile['sha256'][:12]}",
            "changes": NONE[lang]}
    for i, row in enumerate(GENERAL[lang]):
        lines.append("| " + " | ".join(cell.format(**fill) for cell in row) + " |")
        if i == 0:
            lines.append("| --- | --- | --- |")
    lines += ["", h["perf"], "", markdown_table(results, lang)]
    return "\n".join(lines)


def _label(vendor: str, device: str) -> str:
    """'Nvidia GPU', 'nvidia A100' as the seed writes them; the CPU profile on a CPU is just 'CPU'."""
    return device if vendor.lower() == device.lower() else f"{vendor} {device}"


def _hardware_values(results: list[dict], hardware: dict, lang: str) -> list[str]:
    env = results[0].get("environment") or {}
    accelerator = env.get("device_name") or "/"
    network = hardware.get("network") or "/"
    busbw = sorted({r["nccl_busbw_gbps"] for r in results if r.get("nccl_busbw_gbps")})
    if busbw:  # measured by the user with nccl-tests and recorded with the run
        network += f" (nccl-tests all_reduce busbw {', '.join(f'{b:g}' for b in busbw)} GB/s)"
    return [hardware.get("machine") or "/", accelerator, env.get("cpu_model") or "/", network]


def _software_values(env: dict, software: dict, lang: str) -> list[str]:
    framework = ", ".join(f"{name}-{env[key]}" for name, key in (("pytorch", "torch"), ("deepspeed", "deepspeed"),
                                                                    ("accelerate", "accelerate")) if env.get(key))
    dependencies = ", ".join(x for x in (software.get("dependencies"),
                                         *(f"{k}-{env[k]}" for k in ("timm", "webdataset") if env.get(k))) if x)
    driver = env.get("driver") or (NONE[lang] if env.get("device_type") == "cpu" else "/")
    return [env.get("os") or "/", env.get("kernel") or "/", driver, software.get("container") or "/", framework or "/",
            dependencies or NONE[lang]]


def _dataset(r: dict, lang: str) -> str:
    data = (r.get("plan") or {}).get("data") or {}
    classes, train, val = data.get("num_classes"), data.get("train_samples"), data.get("validation_samples")
    if classes == 1000 and train and train > 1_000_000:
        return "Imagenet2012 1K"
    what = "类" if lang == "zh" else " classes"
    return f"{data.get('source', '/')} ({classes}{what}, {train} train / {val} validation)"
