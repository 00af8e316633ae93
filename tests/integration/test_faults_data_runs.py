"""Bad data, fp16 and an unreachable W&B under real training launches: the run ends in one clear line or carries
on, never a late crash or a spin. The readers' own handling of the same faults is in tests/unit/test_faults_data.py."""

import shutil
import subprocess
import time

import pytest

from vitbench import reporting
from vitbench.data import shardformat, shardread

from conftest import BIN, REPO, TINY, copy_shards, info, launch, results, run_env, wandb_history, write_info


def run_args(shards, out, *extra):
    return [*TINY, "--data-dir", str(shards), "--output-dir", str(out), "--batch-size", "8",
            "--global-batch-size", "16", "--mixup", "0", "--cutmix", "0", "--smoothing", "0", "--lr", "2e-3",
            "--log-interval", "1", "--wandb", "off", *extra]


@pytest.mark.slow
def test_pipe_shard_name_runs_no_command_even_with_data_dir_dot(demo_shards, tmp_path):
    """A file literally named `pipe:touch PWNED` in the data dir, listed in _info.json, with --data-dir .:
    webdataset's opener would run it through a shell. Ours refuses it at start, and our tar reader
    opens such a name as a plain file."""
    shards = copy_shards(demo_shards, tmp_path / "d")
    meta = info(shards)
    hostile = "pipe:touch PWNED"
    shutil.copy(shards / meta["splits"]["train"]["filenames"][0], shards / hostile)
    meta["splits"]["train"]["filenames"][0] = hostile
    write_info(shards, meta)
    proc = subprocess.run([str(BIN / "python"), str(REPO / "train_vit.py"),
                           *run_args(".", tmp_path / "run", "--max-steps", "1")],
                          cwd=shards, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not a plain relative file name" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    samples = list(shardread.tar_samples(str(shards / hostile), shardread.SkipLog()))
    assert samples and all(s["__url__"] == str(shards / hostile) for s in samples)
    assert not (shards / "PWNED").exists() and not (tmp_path / "PWNED").exists()


@pytest.mark.slow
def test_unreadable_train_split_is_an_error_not_an_endless_retry(demo_shards, tmp_path):
    shards = copy_shards(demo_shards, tmp_path / "d")
    split = info(shards)["splits"]["train"]
    # Not tars at all: refused at start, naming the shard.
    (shards / split["filenames"][0]).write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(shardformat.DataError, match=f"{split['filenames'][0]}: not a tar file"):
        shardformat.load_split(shards, "train")
    # Every shard cut inside its first member: the header passes the start check, no sample can be read.
    for name in split["filenames"]:
        (shards / name).write_bytes((demo_shards / name).read_bytes()[:700])
    t0 = time.time()
    proc = launch(run_args(shards, tmp_path / "run", "--max-steps", "2"), processes=1,
                  check=False, timeout=300)
    assert proc.returncode == 2 and time.time() - t0 < 120
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "train shards in a row" in err[0]
    assert any(name in err[0] for name in split["filenames"]), "the error names the shards it could not read"
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_truncated_validation_shard_counts_every_lost_sample_and_the_report_marks_it(demo_shards, tmp_path):
    shards = copy_shards(demo_shards, tmp_path / "d")
    split = info(shards)["splits"]["validation"]
    longest = max(range(len(split["filenames"])), key=lambda i: split["shard_lengths"][i])
    path = shards / split["filenames"][longest]
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 3])
    kept = len(list(shardread.tar_samples(str(path), shardread.SkipLog(), count_read_errors=False)))
    lost = split["shard_lengths"][longest] - kept
    assert lost > 0
    out = tmp_path / "run"
    launch(run_args(shards, out, "--max-steps", "1"), processes=1)
    r = results(out)
    assert r["skipped_corrupt"]["validation"] == lost
    assert r["eval_samples"] == split["num_samples"] - lost == r["val_num_samples"] - lost
    table = reporting.markdown_table([r], "en")
    assert f"{r['final_acc1']:.3f}*" in table
    assert f"{r['eval_samples']} of {r['val_num_samples']}" in table


# ---- 3. fp16 where the CPU has it ---------------------------------------------------------------
@pytest.mark.slow
def test_fp16_runs_verified_where_supported_and_is_refused_where_not(demo_shards, tmp_path):
    from deepspeed.accelerator import get_accelerator

    out = tmp_path / "run"
    proc = launch(run_args(demo_shards, out, "--precision", "fp16", "--max-steps", "2", "--model-kwargs", "depth=1"),
                  processes=1, check=False)
    if get_accelerator().is_fp16_supported():  # e.g. a CPU with AVX512-FP16: DeepSpeed runs fp16 there
        assert proc.returncode == 0, proc.stderr[-3000:]
        eff = results(out)["precision_in_effect"]
        assert eff["param_dtype"] == "torch.float16" and eff["logits_dtype"] == "torch.float16"
        assert eff["loss_scaler"] == "deepspeed dynamic"
    else:
        assert proc.returncode == 2 and "--precision fp16 needs fp16 weights" in proc.stderr
        assert "Traceback" not in proc.stderr and not out.exists()


# ---- 4. W&B never costs the run its metrics ------------------------------------------------------
@pytest.mark.slow
def test_wandb_unreachable_falls_back_to_offline_files(demo_shards, tmp_path):
    out = tmp_path / "run"
    env = run_env(WANDB_API_KEY="x" * 40, WANDB_BASE_URL="http://127.0.0.1:9", WANDB_INIT_TIMEOUT="3")
    env.pop("WANDB_MODE")
    proc = subprocess.run([str(BIN / "python"), str(REPO / "train_vit.py"),
                           *run_args(demo_shards, out, "--max-steps", "3", "--wandb", "online")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logging offline instead" in proc.stdout and "wandb sync" in proc.stdout
    steps = [row["train/step"] for row in wandb_history(out) if "train/step" in row]
    assert steps == [1, 2, 3] and results(out)["global_step"] == 3
