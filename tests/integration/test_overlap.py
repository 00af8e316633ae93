"""Gradient reduction overlaps backward with the shipped DeepSpeed configs: real DeepSpeed, 2 CPU ranks (gloo)
under `accelerate launch`, a ViT with more parameters than one reduce bucket."""

import json
import subprocess

import pytest

from conftest import ACCELERATE_LAUNCH, REPO, run_env

pytestmark = pytest.mark.slow
OLD_BUCKET = "reduce_bucket_size=5e8"  # what zero1/zero2.json shipped before: the whole ViT-B gradient in one bucket


def test_gradient_reduction_starts_before_backward_ends_with_the_shipped_buckets():
    configs = [f"ds_configs/zero{stage}.json" for stage in (1, 2, 3)]
    old = f"ds_configs/zero2.json:{OLD_BUCKET}"
    proc = subprocess.run([*ACCELERATE_LAUNCH, "--config_file", "accelerate_configs/cpu_1x2.yaml",
                           "tests/overlap_probe.py", *configs, old], cwd=REPO, env=run_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    early = json.loads(proc.stdout.strip().splitlines()[-1])
    for config in configs:
        assert early[config] >= 1, f"{config}: no gradient reduction began before backward reached block 0"
    assert early[old] == 0, "with one bucket for every gradient, reduction waits for the end of backward"
