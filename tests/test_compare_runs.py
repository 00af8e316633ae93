"""`report.py compare` on real launches: two identical ones are within noise and train alike; a depth-6 model
against depth 2 is slower, with the depth listed first, and fails a --fail-if-slower 10 gate; another seed trains
like the base (seeds 0 and 1, its repeats), and so does a 16-bit precision against fp32; lr x30 does not. Seven
short one-process runs (about 10 s each where the CPU has bf16 units; slower without)."""

import json
import subprocess

import pytest

from conftest import BIN, REPO, TINY, launch

pytestmark = pytest.mark.slow


def sixteen_bit() -> str:
    """bf16 where DeepSpeed's accelerator reports it, else amp: the test asks the machine."""
    from deepspeed.accelerator import get_accelerator

    return "bf16" if get_accelerator().is_bf16_supported() else "amp"


@pytest.fixture(scope="module")
def runs(demo_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    specs = {"a": ["--model-kwargs", "depth=2"], "a2": ["--model-kwargs", "depth=2"],
             "deep": ["--model-kwargs", "depth=6"], "seed1": ["--model-kwargs", "depth=2", "--seed", "1"],
             "seed2": ["--model-kwargs", "depth=2", "--seed", "2"],
             "lr30": ["--model-kwargs", "depth=2", "--lr", "6e-2"],
             "16bit": ["--model-kwargs", "depth=2", "--precision", sixteen_bit()]}
    dirs = {}
    for name, extra in specs.items():
        dirs[name] = root / name
        launch([*TINY, "--data-dir", str(demo_shards), "--output-dir", str(dirs[name]), "--run-name", name,
                "--batch-size", "8", "--global-batch-size", "16", "--mixup", "0", "--cutmix", "0", "--smoothing", "0",
                "--lr", "2e-3", "--warmup-epochs", "0.5", "--epochs", "2", "--log-interval", "1",
                "--timing-warmup-steps", "2", "--wandb", "off", *extra], processes=1)
    return dirs


def compare(*args):
    proc = subprocess.run([str(BIN / "python"), str(REPO / "report.py"), "compare", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env={"PATH": str(BIN)})
    return proc


def figures(proc) -> dict:
    (result,) = json.loads(proc.stdout)
    return result, {f["figure"]: f for f in result["figures"]}


def test_identical_launches_are_within_noise_and_train_alike(runs):
    result, f = figures(compare(runs["a"], runs["a2"], "--json"))
    assert f["p_core_steady"]["verdict"] == f["p_train_steady"]["verdict"] == "within noise"
    assert f["p_core_steady"]["interval"] is not None  # from the runs' own step times
    assert result["differences"] == [] and result["parity"]["verdict"] == "trains like the base"
    assert compare(runs["a"], runs["a2"], "--fail-if-slower", "10").returncode == 0


def test_a_deeper_model_is_slower_with_the_depth_listed_first(runs):
    result, f = figures(compare(runs["a"], runs["deep"], "--json"))
    assert f["p_core_steady"]["verdict"] == "slower" and f["p_core_steady"]["interval"][1] < 1
    assert result["differences"][0]["field"] == "plan.model_kwargs.depth"
    assert (result["differences"][0]["base"], result["differences"][0]["candidate"]) == (2, 6)
    gate = compare(runs["a"], runs["deep"], "--fail-if-slower", "10")
    assert gate.returncode == 1 and "p_core_steady" in gate.stderr


def test_another_seed_trains_like_the_base_and_lr_x30_does_not(runs):
    result, _ = figures(compare(runs["a"], runs["seed2"], "--base-repeat", runs["seed1"], "--json"))
    p = result["parity"]
    assert p["verdict"] == "trains like the base", p
    assert p["repeats_mean_relative_error"] > 0 and p["loss_mean_relative_error"] <= p["threshold"]
    assert result["differences"] == []  # the seed is what repeats differ in
    result, _ = figures(compare(runs["a"], runs["lr30"], "--base-repeat", runs["seed1"], "--json"))
    p = result["parity"]
    assert p["verdict"] == "differs" and p["loss_mean_relative_error"] > p["threshold"] >= 0.02
    assert result["differences"][0]["field"].startswith("plan.recipe")


def test_a_16_bit_precision_trains_like_fp32(runs):
    result, _ = figures(compare(runs["a"], runs["16bit"], "--json"))
    assert result["parity"]["verdict"] == "trains like the base", result["parity"]
    assert result["parity"]["threshold"] == 0.02  # FlagPerf's bound: one base run, no repeats to widen it
    assert result["differences"][0]["field"].startswith("plan.precision")
