"""Vendor profiles (FlagPerf's contract: a vendor changes only what is tied to the hardware) and the seed's whole
README generated from run files. In-process, milliseconds; the CPU profile's demo run is in test_trainer."""

import json
import re
from pathlib import Path

import pytest
from test_plan import H200, ONE_NODE_8, make

from vitbench import cli, reporting, seed_readme, vendor

from conftest import DATA, REPO

RESULTS = DATA / "results"
SEED = REPO.parent / "shared" / "seed"
# The seed's structure (FlagPerf's training/nvidia/vit-pytorch/README.md): its headings, the hardware and software
# fields, the 通用指标 rows, and the 性能指标 columns, in order.
SEED_HEADINGS = ["#### 环境配置", "- ##### 硬件环境", "- ##### 软件环境", "### 运行情况", "* 通用指标", "* 性能指标"]
SEED_HARDWARE = ["机器型号", "加速卡型号", "CPU型号", "多机网络类型、带宽"]
SEED_SOFTWARE = ["OS版本", "OS kernel版本", "加速卡驱动版本", "Docker 版本", "训练框架版本", "依赖软件版本"]
SEED_GENERAL = ["指标名称", "任务类别", "模型", "数据集", "数据精度", "超参修改", "硬件设备简称", "硬件存储使用", "端到端时间",
                "总吞吐量", "训练吞吐量", "**计算吞吐量**", "训练结果", "额外修改项"]
SEED_COLUMNS = ["配置", "precision", "fix_hp", "e2e_time", "p_whole", "p_train", "p_core", "final_acc1", "mem"]


def profile(tmp_path, text: str, files: dict | None = None) -> Path:
    d = tmp_path / "acme"
    d.mkdir(exist_ok=True)
    (d / "profile.toml").write_text(text)
    for name, content in (files or {}).items():
        (d / name).write_text(content)
    return d


def test_the_shipped_profiles_load_and_keep_to_the_rule():
    for name in ("nvidia", "cpu"):
        p = vendor.load(name)
        assert p.name == name and len(p.sha256) == 64 and set(p.overrides) <= set(vendor.ALLOWED_OVERRIDES)
    assert vendor.load("nvidia").overrides["batch_size"] == 256  # FlagPerf's NVIDIA fix_hp, bs=256


@pytest.mark.parametrize("text, message", [
    ("[overrides]\nlr = 0.1\n", "overrides.lr changes the optimizer"),
    ("[overrides]\nmodel = 'vit_large_patch16_224'\n", "overrides.model changes the model"),
    ("[overrides]\nepochs = 10\n", "overrides.epochs changes the schedule"),
    ("[overrides]\naa = 'none'\n", "overrides.aa changes the augmentation"),
    ("[overrides]\ndata_dir = '/x'\n", "overrides.data_dir changes the data"),
    ("[overrides]\nprecision = 'bf16'\n", "overrides.precision changes the precision label"),
    ("[overrides]\ntarget_acc1 = 70\n", "overrides.target_acc1 changes the target"),
    ("[overrides]\nglobal_batch_size = 8192\n", "overrides.global_batch_size changes the global batch"),
    ("[overrides]\nbogus = 1\n", "overrides.bogus is not a flag a profile may set"),
    ("[env]\nVITBENCH_DATA_DIR = '/x'\n", "env.VITBENCH_DATA_DIR is not a communication"),
    ("[launch]\ndeepspeed = 'ds.json'\n", "optimizer is not a communication setting"),
    ("[launch]\n'1x8' = '../../../../etc/passwd'\n", "is not a file inside"),
    ("[recipe]\nlr = 1\n", "unknown section or key 'recipe'"),
    ("overrides = [", "not valid TOML"),
])
def test_a_profile_that_changes_more_than_the_hardware_is_refused_naming_key_and_file(tmp_path, text, message):
    d = profile(tmp_path, text, {"ds.json": json.dumps({"optimizer": {"type": "SGD"}})})
    with pytest.raises(vendor.VendorError, match=re.escape(message)) as e:
        vendor.load(str(d))
    assert str(e.value).startswith(str(d)) or str(d) in str(e.value)


def test_a_profile_refused_on_the_command_line_is_one_line(tmp_path, capsys):
    d = profile(tmp_path, "[overrides]\nlr = 0.1\n")
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--vendor", str(d)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "overrides.lr changes the optimizer" in err


@pytest.mark.parametrize("text, message", [("batch_size = -5", "overrides.batch_size = -5: must be a finite number >= 1"),
                                           ("loader = 'tfrecord'", "expected one of wds, dali"),
                                           ("compile = 'yes'", "expected true or false"),
                                           ("workers = 'many'", "expected an integer")])
def test_a_profiles_values_pass_the_flags_own_checks(tmp_path, capsys, text, message):
    d = profile(tmp_path, f"[overrides]\n{text}\n")
    with pytest.raises(SystemExit):
        cli.parse_args(["--vendor", str(d)])
    err = capsys.readouterr().err
    assert message in err and str(d / "profile.toml") in err and err.count("\n") == 1


def test_allowed_overrides_become_defaults_flags_still_win_and_fix_hp_is_the_profile(tmp_path):
    args = cli.parse_args(["--vendor", "nvidia"])
    assert (args.batch_size, args.workers) == (256, 16) and args.fix_hp == {"batch_size": 256, "workers": 16}
    typed = cli.parse_args(["--vendor", "nvidia", "--batch-size", "128"])
    assert typed.batch_size == 128 and typed.fix_hp["batch_size"] == 128


def test_the_plan_applies_and_records_the_profile(demo_shards, tmp_path):
    ds = {"zero_optimization": {"reduce_bucket_size": 123456, "overlap_comm": False}}
    d = profile(tmp_path, "[overrides]\nbatch_size = 128\n[env]\nNCCL_IB_HCA = 'mlx5'\n"
                          "[launch]\ndeepspeed = 'ds.json'\n", {"ds.json": json.dumps(ds)})
    p = make(demo_shards, ["--vendor", str(d), "--batch-size", "256"], ONE_NODE_8, H200)
    assert p.grad_accum == 4096 // (256 * 8)  # the global batch stays the recipe's; accumulation re-derived
    zero = p.ds_config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 123456 and zero["overlap_comm"] is False
    assert p.vendor_env == {"NCCL_IB_HCA": "mlx5"}
    recorded = p.to_json()["vendor"]
    assert recorded["path"] == str(d / "profile.toml") and recorded["deepspeed"] == ds and len(recorded["sha256"]) == 64
    assert p.fix_hp["batch_size"] == 256  # what ran


def seeded_runs() -> list[dict]:
    """The recorded A100 rows as runs of the NVIDIA profile."""
    p = vendor.load("nvidia").to_json()
    env = {"device_type": "cuda", "device_name": "NVIDIA A100-SXM4-40GB", "cpu_model": "AMD EPYC 7742 64-Core",
           "os": "Ubuntu 20.04", "kernel": "5.4.0-113-generic", "driver": "470.129.06", "torch": "2.14.1",
           "deepspeed": "0.19.8", "accelerate": "1.15.0"}
    runs = []
    for name in ("a100_1x8.json", "a100_1x1.json", "a100_2x8.json"):
        r = json.loads((RESULTS / name).read_text())
        runs.append({**r, "environment": env, "plan": {**(r.get("plan") or {}), "vendor": p,
                                                        "model": "vit_base_patch16_224"}})
    return runs


def test_the_seeds_readme_is_generated_in_its_structure_from_run_files():
    text = seed_readme.write(seeded_runs(), "zh")
    lines = text.splitlines()
    assert lines[0] == "### Nvidia GPU配置与运行信息参考"
    assert [line for line in lines if re.match(r"(#+ |- #+ |\* )", line)][1:] == SEED_HEADINGS
    fields = [re.split(r"[:：]", line.strip("- ").strip(), maxsplit=1)[0] for line in lines
              if line.startswith(("    - ", "   - "))]
    assert fields == SEED_HARDWARE + SEED_SOFTWARE
    general = [line.split("|")[1].strip() for line in lines[lines.index("* 通用指标"):lines.index("* 性能指标")]
               if line.startswith("| ") and "---" not in line]
    assert general == SEED_GENERAL
    header = next(line for line in lines if line.startswith("| 配置"))
    assert [c.strip().split(" (")[0] for c in header.strip("|").split("|")][:9] == SEED_COLUMNS  # + scaling
    # every field from the runs and the profile: nothing typed by hand
    assert "    - 机器型号: NVIDIA DGX A100 (40G)" in lines and "    - 加速卡型号: NVIDIA A100-SXM4-40GB" in lines
    assert "   - 加速卡驱动版本：470.129.06" in lines and "| 硬件设备简称 | nvidia A100 |  |" in lines
    assert reporting.markdown_table(seeded_runs(), "zh") in text
    english = seed_readme.write(seeded_runs(), "en")
    assert english.startswith("### Nvidia GPU: configuration and run information") and "    - Machine: NVIDIA DGX" in english


@pytest.mark.skipif(not SEED.is_dir(), reason="the seed's README lies in ../shared/seed (the project's workspace)")
def test_the_structure_checked_above_is_the_seeds_own():
    seed = next(SEED.iterdir()).read_text().splitlines()
    assert [line.strip() for line in seed if re.match(r"\s*(#### |- #+ |### 运行|\* )", line)] == SEED_HEADINGS
    fields = [re.split(r"[:：]", line.strip().lstrip("- ").strip(), maxsplit=1)[0] for line in seed
              if re.match(r"\s+- [^#]", line)]
    assert fields == SEED_HARDWARE + SEED_SOFTWARE
    table = [line.split("|")[1].strip() for line in seed if line.startswith("| ") and "---" not in line]
    assert table[:len(SEED_GENERAL)] == SEED_GENERAL and table[len(SEED_GENERAL)] == SEED_COLUMNS[0]


def test_runs_of_no_or_several_profiles_are_refused():
    runs = seeded_runs()
    with pytest.raises(reporting.ResultsError, match="needs runs of one vendor profile"):
        seed_readme.write([runs[0], {**runs[1], "plan": {}}])
