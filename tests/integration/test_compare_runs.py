"""`report.py compare` on real launches: two identical ones are within noise and train alike; a depth-6 model
against depth 2 is slower, with the depth listed first, and fails a --fail-if-slower 10 gate; another seed trains
like the base (seeds 0 and 1, its repeats), and so does a 16-bit precision against fp32; lr x30 does not. The
base and the precision pair are the shared runs (tests/conftest.py); five more short one-process runs here (the three
whose losses alone are compared at once)."""

import json

import pytest

from conftest import launch, launch_together, run_command, shared_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(shared_runs, demo_shards, tmp_path_factory):
    """The shared one-process fp32 run as the base ("a"), its 2-process fp32 and 16-bit runs (tests/conftest.py),
    and five one-process runs made with the base's flags but for what each name says."""
    root = tmp_path_factory.mktemp("compare")
    specs = {"a2": [], "deep": ["--model-kwargs", "depth=6"], "seed1": ["--seed", "1"], "seed2": ["--seed", "2"],
             "lr30": ["--lr", "6e-2"]}
    dirs = {"a": shared_runs["a_1p_fp32_z1"], "fp32_2p": shared_runs["b_2p_fp32_z1"],
            "16bit_2p": shared_runs["d_2p_16bit_z1"]}
    for name in specs:
        dirs[name] = root / name

    def args(name):
        return shared_args(demo_shards, dirs[name], name, "--precision", "fp32", "--zero-stage", "1", *specs[name])

    for name in ("a2", "deep"):  # timing is compared: one at a time
        launch(args(name), processes=1)
    launch_together([(args(name), {}) for name in ("seed1", "seed2", "lr30")])  # only their losses are compared
    return dirs


def compare(*args):
    return run_command("report", "compare", *args)  # report.py compare, in-process


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
    result, _ = figures(compare(runs["fp32_2p"], runs["16bit_2p"], "--json"))
    assert result["parity"]["verdict"] == "trains like the base", result["parity"]
    assert result["parity"]["threshold"] == 0.02  # FlagPerf's bound: one base run, no repeats to widen it
    assert result["differences"][0]["field"].startswith("plan.precision")
