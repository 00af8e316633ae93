"""The trainer on --loader dali (DALI's CPU operators): it trains and evaluates every validation sample."""


import pytest

from vitbench.data import dali_loader

from conftest import TINY, info, launch, results


@pytest.mark.slow
def test_trainer_with_dali_trains_and_evaluates_every_sample(demo_shards, tmp_path):
    out = tmp_path / "run"
    launch([*TINY, "--data-dir", str(demo_shards), "--output-dir", str(out), "--batch-size", "8",
            "--global-batch-size", "16", "--aug-repeats", "3", "--max-steps", "4", "--log-interval", "2",
            "--wandb", "off", "--loader", "dali"], processes=1)
    r = results(out)
    assert r["loader"] == "dali" and r["epoch_sampling"] == dali_loader.EPOCH_SAMPLING
    assert r["global_step"] == 4 and r["train_samples"] == 4 * 16
    assert r["eval_samples"] == info(demo_shards)["splits"]["validation"]["num_samples"]
