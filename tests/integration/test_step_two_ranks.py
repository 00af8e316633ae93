"""Two gloo ranks under `accelerate launch` apply what a plain PyTorch step applies: the one-rank matrix's
cases (tests/step_numerics.py, tests/unit/test_optim.py) with accumulation 2."""

import json
import subprocess

import pytest

import step_numerics as sn
from conftest import ACCELERATE_LAUNCH, REPO, run_env


@pytest.mark.slow
def test_two_ranks_apply_what_a_plain_step_applies():
    # accumulation 2 only: micro-batches summed and reduced across ranks in one step (every stage's reduction
    # runs at the boundary either way); accumulation 1 is in the one-rank matrix
    cases = [c for c in sn.CASES if sn.supported(c[0]) and c[2] == 2]
    proc = subprocess.run([*ACCELERATE_LAUNCH, "--config_file", "accelerate_configs/cpu_1x2.yaml",
                           "tests/step_numerics.py", *(f"{label}:{stage}:{accum}" for label, stage, accum in cases)],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for label, stage, accum in cases:
        where = f"2 ranks {label} ZeRO-{stage} accum {accum}"
        sn.assert_plain_update(results[f"{label}:{stage}:{accum}"], label, where)
