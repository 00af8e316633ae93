"""train_vit.py end to end: real `accelerate launch`, real DeepSpeed (gloo on CPU), real W&B offline files."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from vitbench import checkpoint
from vitbench import metrics as M
from vitbench.reporting import GPU_OR_FP16_ONLY, WORKSPACE_SECTIONS
from vitbench.tracking import METRICS_FILE

from conftest import (
    BIN,
    REPO,
    SHARED_PEAK,
    SHARED_STEPS,
    TINY,
    USER_LAUNCH,
    info,
    launch,
    results,
    run_command,
    run_env,
    wandb_history,
    wandb_records,
    wandb_summary,
)

pytestmark = pytest.mark.slow


def common(demo_shards, out, *extra):
    return [*TINY, "--data-dir", str(demo_shards), "--output-dir", str(out), "--batch-size", "8",
            "--global-batch-size", "16", "--mixup", "0", "--cutmix", "0", "--smoothing", "0", "--lr", "2e-3",
            "--warmup-epochs", "0.5", "--log-interval", "2", "--timing-warmup-steps", "2", *extra]


@pytest.fixture(scope="module", params=["b_2p_fp32_z1", "c_2p_fp32_z2"], ids=["zero1", "zero2"])
def two_rank_run(request, shared_runs):
    """Two ranks, ZeRO-1 or ZeRO-2, two epochs, W&B offline: the shared runs (tests/conftest.py)."""
    return int(request.param[-1]), shared_runs[request.param]


def test_two_ranks_train_identical_replicas_and_evaluate_every_sample(two_rank_run, demo_shards):
    stage, out = two_rank_run
    r = results(out)
    assert r["zero_stage"] == stage and r["world_size"] == 2 and r["global_batch_size"] == 16
    assert r["global_step"] == SHARED_STEPS == 2 * (120 // 16)
    assert len(r["replica_checksums"]) == 2 and len(set(r["replica_checksums"])) == 1
    assert r["eval_samples"] == info(demo_shards)["splits"]["validation"]["num_samples"]
    assert all(e["samples"] == r["eval_samples"] for e in r["evals"])
    losses = [row["train/loss"] for row in wandb_history(out) if "train/loss" in row]
    assert sum(losses[-4:]) < sum(losses[:4]), f"the loss must fall: {losses}"  # a row per step: 4 steps each
    assert r["final_acc1"] > 10.0 * 1.5  # chance is 10% on the 10 demo classes
    eff = r["precision_in_effect"]
    assert eff["param_dtype"] == "torch.float32" and eff["logits_dtype"] == "torch.float32"
    assert not eff["tf32_matmul"] and not eff["tf32_cudnn"] and eff["autocast_dtype"] is None


def test_results_hold_the_six_metrics_and_the_invariant(two_rank_run):
    _, out = two_rank_run
    r = results(out)
    for key in ("e2e_time", "p_whole", "p_train", "p_core", "final_acc1", "mem_used_gib", "mem_total_gib",
                "p_whole_steady", "p_train_steady", "p_core_steady"):
        assert r[key] is not None and r[key] > 0, key
    assert r["p_core"] >= r["p_train"] >= r["p_whole"]
    assert r["p_core_steady"] >= r["p_train_steady"] >= r["p_whole_steady"]
    assert r["e2e_time"] > r["train_time"] > r["eval_time"] > 0
    assert r["mem"] == f"{r['mem_used_gib']:.1f}/{r['mem_total_gib']:.1f}" and "CPU" in r["mem_source"]
    import platform
    from importlib.metadata import version

    import torch

    env = r["environment"]
    assert env["torch"] == torch.__version__ and env["python"] == platform.python_version()
    for pkg in ("deepspeed", "accelerate", "timm", "webdataset"):
        assert env[pkg] == version(pkg), pkg
    assert env["device_type"] == "cpu" and env["cpu_count"] == os.cpu_count()
    from deepspeed.accelerator import get_accelerator  # the process group's backend is the accelerator's

    assert env["backend"] == get_accelerator().communication_backend_name() and env["os"] and env["kernel"]
    sensors = r["hw_monitor"]["sensors"]  # the monitor ran; a sensor this machine lacks is absent with a reason
    assert sensors["host_cpu"]["available"] and all(s["available"] or s["reason"] for s in sensors.values())
    assert all(n > 0 for n in r["hw_monitor"]["samples"]) and len(r["energy_j_per_device"]) == 2
    if not any(s["available"] for n, s in sensors.items() if n != "host_cpu"):
        assert r["energy_j"] is None and r["img_per_joule"] is None  # never 0
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert env["git_commit"].removesuffix("-dirty") == head
    assert r["plan"]["deepspeed_config"]["timers"]["throughput"]["enabled"] is False
    assert r["config"]["fused_attn"] is True  # timm's ViT attention runs through PyTorch SDPA
    assert r["plan"]["measurement"]["peak_tflops_source"] == "--peak-tflops"
    # MFU from the summary's own figures: FLOPs per sample x p_core per device over the given peak.
    assert r["mfu_core(%)"] == pytest.approx(100 * r["config"]["flops_per_sample"] * r["p_core"] / 2 / 1e12 /
                                             SHARED_PEAK)


def test_wandb_offline_files_hold_step_rows_and_summary(two_rank_run):
    stage, out = two_rank_run
    rows = [row for row in wandb_history(out) if "train/step" in row]
    assert [row["train/step"] for row in rows] == list(range(1, SHARED_STEPS + 1))  # --log-interval 1
    for key in (M.THROUGHPUT, M.THROUGHPUT_PER_DEVICE, M.STEP_TIME, M.DATA_WAIT_PCT, M.TFLOPS_PER_DEVICE, M.MFU,
                M.MEM_HOST_RSS, M.LR, M.GRAD_NORM, M.LOSS):
        assert all(f"{M.TRAIN_PREFIX}{key}" in row for row in rows), key
    for row in rows:  # MFU rows: achieved TFLOP/s per device over the --peak-tflops given
        tflops = row[f"{M.TRAIN_PREFIX}{M.TFLOPS_PER_DEVICE}"]
        assert row[f"{M.TRAIN_PREFIX}{M.MFU}"] == pytest.approx(100 * tflops / SHARED_PEAK)
    summary = wandb_summary(out)
    r = results(out)
    for key in ("e2e_time", "p_whole", "p_train", "p_core", "final_acc1", "mem_used_gib"):
        assert summary["summary"][key] == pytest.approx(r[key]), key
    assert summary["summary"]["results"]["_type"] == "table-file"
    assert summary["config"]["plan"]["zero_stage"] == stage and summary["state"] == "finished"
    # The dashboard's panels plot series this run really logged (MFU, device memory and loss scale
    # exist only on GPUs / in fp16).
    logged = set().union(*rows, *wandb_history(out))
    for panels in WORKSPACE_SECTIONS.values():
        for _, keys in panels:
            for key in keys:
                assert key in logged or key in GPU_OR_FP16_ONLY, key


def test_metrics_jsonl_holds_every_row_wandb_got(two_rank_run):
    """metrics.jsonl: the same rows as W&B (same names, same values), plus evaluations and checkpoints."""
    _, out = two_rank_run
    lines = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    train = [row for row in lines if row["kind"] == "train"]
    wandb_rows = [row for row in wandb_history(out) if "train/step" in row]
    assert [row["step"] for row in train] == [row["train/step"] for row in wandb_rows]
    for ours, theirs in zip(train, wandb_rows):
        for key in (M.THROUGHPUT, M.LOSS, M.LR, M.MFU, M.DATA_WAIT_PCT):
            assert ours[key] == pytest.approx(theirs[f"{M.TRAIN_PREFIX}{key}"]), key
    evals = [row for row in lines if row["kind"] == "eval"]
    r = results(out)
    assert [(e["step"], e[M.ACC1]) for e in evals] == [(e["step"], e["acc1"]) for e in r["evals"]]
    saves = [row for row in lines if row["kind"] == "checkpoint"]
    # a save every 2 steps inside the train window, the last one (the final save) outside it: each timed and sized
    assert [row["step"] for row in saves] == list(range(2, r["global_step"] + 1, 2))
    assert all(row["seconds"] > 0 and row["bytes"] > 12 * r["plan"]["n_params"] for row in saves)
    assert r["checkpoints"] == [{k: row[k] for k in ("step", "seconds", "bytes")} for row in saves]
    assert r["checkpoint_time"] == pytest.approx(sum(row["seconds"] for row in saves))
    assert r["checkpoint_max_s"] == max(row["seconds"] for row in saves) > 0
    periodic = sum(row["seconds"] for row in saves[:-1])  # the train window's pauses hold each periodic save
    assert periodic <= r["checkpoint_time_in_train_window"] < r["train_time"] and r["units"]["p_core"] == "img/s"


def test_zero3_evaluation_keeps_ranks_in_lockstep(demo_shards, tmp_path):
    """3 ranks over 50 validation images in batches of 16: 16/17/17 images, so 1 or 2 batches per rank.
    ZeRO-3 gathers parameters inside every forward, so the short rank must pad (uncounted) or all hang."""
    out = tmp_path / "run"
    launch(common(demo_shards, out, "--zero-stage", "3", "--global-batch-size", "24", "--max-steps", "2",
                  "--wandb", "off"), processes=3, timeout=600)
    r = results(out)
    assert r["zero_stage"] == 3 and r["world_size"] == 3
    assert r["eval_samples"] == info(demo_shards)["splits"]["validation"]["num_samples"] == 50


def test_killed_run_resumes_from_newest_complete_checkpoint(demo_shards, tmp_path):
    out = tmp_path / "run"
    args = common(demo_shards, out, "--max-steps", "12", "--checkpoint-every", "2", "--keep-checkpoints", "3",
                  "--epochs", "3", "--wandb", "off")
    proc = subprocess.Popen([str(BIN / "python"), str(REPO / "train_vit.py"), *args], cwd=REPO, env=run_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint.complete_checkpoints(out / "checkpoints"):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = checkpoint.complete_checkpoints(out / "checkpoints")
    assert saved and saved[-1][0] < 12, "the kill must land mid-run"
    newest = saved[-1][0]
    # What a SIGKILL during a save leaves behind must be ignored: a .tmp folder, a folder without marker.
    shutil.copytree(saved[-1][1], out / "checkpoints" / "step_00000011.tmp")
    (out / "checkpoints" / "step_00000011.tmp" / checkpoint.MARKER).unlink()
    shutil.copytree(out / "checkpoints" / "step_00000011.tmp", out / "checkpoints" / "step_00000010")

    launch([*args, "--resume", "auto"], processes=1)
    r = results(out)
    assert r["resumed_from_step"] == newest
    assert r["global_step"] == 12
    assert r["train_samples"] == (12 - newest) * 16  # throughput counts only this launch's steps
    assert r["epochs_done"] == 12 // (120 // 16)
    assert checkpoint.complete_checkpoints(out / "checkpoints")[-1][0] == 12
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_two_machines_in_miniature(shared_runs):
    """2 machines x 1 process: two `accelerate launch` commands, machine_rank 0 and 1, main on 127.0.0.1 (the
    shared 2-machine run, tests/conftest.py)."""
    r = results(shared_runs["e_2m_fp32_z1"])
    assert (r["nnodes"], r["nproc_per_node"], r["world_size"]) == (2, 1, 2)
    assert r["global_step"] == SHARED_STEPS and len(set(r["replica_checksums"])) == 1


def test_bf16_runs_bf16_wandb_without_credentials_goes_offline_and_a_profile_window_is_traced(demo_shards, tmp_path):
    out = tmp_path / "run"
    env = run_env(HOME=str(tmp_path / "home"))
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        env.pop(key, None)
    proc = subprocess.run([str(BIN / "python"), str(REPO / "train_vit.py"),
                           *common(demo_shards, out, "--precision", "bf16", "--max-steps", "3", "--model-kwargs",
                                   "depth=1", "--wandb", "online", "--profile-steps", "1:2")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no credentials found, logging offline" in proc.stdout and "wandb sync" in proc.stdout
    assert wandb_summary(out)["summary"]["p_core"] == pytest.approx(results(out)["p_core"])
    eff = results(out)["precision_in_effect"]  # a plain PyTorch bf16 step: autocast over fp32 weights
    assert eff["param_dtype"] == "torch.float32" and eff["logits_dtype"] == "torch.bfloat16"
    assert eff["autocast_dtype"] == "torch.bfloat16" and eff["gradient_clipping"] == "vitbench.optim.RecipeAdamW"
    ds = results(out)["plan"]["deepspeed_config"]
    assert ds["bf16"]["enabled"] is False and ds["torch_autocast"]["enabled"] is True
    # --profile-steps 1:2, a window inside the run: the torch.profiler trace of those steps
    assert results(out)["global_step"] == 3
    trace = json.loads((out / "profile" / "trace_rank0.json").read_text())
    assert any(e.get("name") == "aten::addmm" for e in trace["traceEvents"])


def test_amp_runs_fp16_autocast_with_dynamic_loss_scaling(demo_shards, tmp_path):
    out = tmp_path / "run"
    # --profile-steps 1:5 outlasts the run (2 steps): the trace of what ran is still written.
    # --workers 0: the train loader reads in the trainer's own process (nothing to stop at the end).
    launch(common(demo_shards, out, "--precision", "amp", "--max-steps", "2", "--log-interval", "1",
                  "--model-kwargs", "depth=1", "--wandb", "offline", "--profile-steps", "1:5", "--workers", "0"),
           processes=1)
    eff = results(out)["precision_in_effect"]
    assert eff["param_dtype"] == "torch.float32" and eff["autocast_dtype"] == "torch.float16"
    assert eff["logits_dtype"] == "torch.float16" and "LossScaler" in eff["loss_scaler"]
    scales = [row["train/loss_scale"] for row in wandb_history(out) if "train/loss_scale" in row]
    assert len(scales) == 2 and all(0 < s <= 2.0**16 for s in scales)
    # --profile-steps: the torch.profiler trace goes to the run dir and to W&B as an artifact
    profiles = [a for a in wandb_records(out, "artifact") if a["type"] == "profile"]
    assert [c["path"] for a in profiles for c in a["manifest"]["contents"]] == ["trace_rank0.json"]
    assert (out / "profile" / "trace_rank0.json").is_file()
    staged = [c["local_path"] for a in wandb_records(out, "artifact") for c in a["manifest"]["contents"]]
    assert staged and all(p.startswith(str(out / "wandb")) for p in staged), "W&B files stay in the run dir"


def test_a_model_whose_loss_went_non_finite_is_not_evaluated(demo_shards, tmp_path):
    """The epoch ends (7 steps) before any log row or checkpoint: the guard stops the run before evaluating."""
    proc = launch(common(demo_shards, tmp_path / "run", "--lr", "1e30", "--epochs", "2", "--log-interval", "100",
                         "--wandb", "off"), processes=1, check=False)
    assert proc.returncode == 2 and "non-finite loss or gradients at step" in proc.stderr, proc.stderr[-3000:]
    assert "eval epoch" not in proc.stdout


def test_bad_input_is_one_clear_message_before_heavy_work(tmp_path):
    """The command-line edge: a Plan error (tests/unit/test_plan.py has the table of them) is one line, exit 2,
    and nothing is started."""
    out = tmp_path / "run"
    proc = launch([*common(tmp_path / "nonexistent", out, "--wandb", "off")], processes=1, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path}/nonexistent/_info.json: not found; make " \
        "shards with `python prep_shards.py` or point --data-dir at a directory holding _info.json and its " \
        "tar shards"
    assert not out.exists(), "nothing may be started for bad input"
    # under accelerate launch (2 ranks): the line once per node, first; then torchrun's own report follows
    # (README: the launcher re-raises it; our line is the cause)
    two = launch([*common(tmp_path / "nonexistent", out, "--wandb", "off")], processes=2, check=False)
    errors = [line for line in two.stderr.splitlines() if line.startswith("error: ")]
    assert two.returncode != 0 and errors == [proc.stderr.strip().splitlines()[-1]]
    assert not out.exists()


def test_demo_trains_well_above_chance(tmp_path):
    """`make demo`'s run, shortened to its first epoch (the warm-up one; README: top-1 about 70-85% after it),
    under the 2-process CPU launch config, launched as the README does (`accelerate launch`)."""
    out = tmp_path / "demo"
    launch(["--demo", "--vendor", "cpu", "--epochs", "1", "--output-dir", str(out)], launcher=USER_LAUNCH)
    r = results(out)
    assert r["final_acc1"] > 50.0  # chance: 10%
    assert r["eval_samples"] == r["val_num_samples"] == 200
    # the CPU vendor profile: recorded, and its overrides shown as fix_hp
    assert r["plan"]["vendor"]["name"] == "cpu" and r["fix_hp"]["workers"] == 1
    readme = run_command("report", out, "--vendor-readme")
    assert readme.returncode == 0 and readme.stdout.startswith("### CPU配置与运行信息参考"), readme.stderr
    assert "workers=1" in readme.stdout and "| 硬件设备简称 | CPU |" in readme.stdout
