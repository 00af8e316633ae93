"""Fault suite, run side: preemption signals, a killed launcher, damaged checkpoints, resume on fewer
processes, a full disk, two runs in one directory, non-finite losses and a read-only output directory. Real
`accelerate launch` + DeepSpeed (gloo), real signals, real filesystems (tmpfs for a full or read-only disk)."""

import os
import re
import signal
import subprocess
import time

import psutil
import pytest
from test_trainer import common

from vitbench import checkpoint

from conftest import ACCELERATE_LAUNCH, BIN, REPO, launch, results, run_env

pytestmark = pytest.mark.slow
LAUNCH = [*ACCELERATE_LAUNCH, "--config_file", str(REPO / "accelerate_configs/cpu_1x2.yaml"),
          "--num_processes", "2", str(REPO / "train_vit.py")]


def wait_for(condition, timeout=300, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def steps_saved(out):
    return [s for s, _ in checkpoint.complete_checkpoints(out / "checkpoints")]


# ---- 1. preemption ---------------------------------------------------------------------------
MAX_STEPS = 30  # the last resume finishes; every interruption before it lands well short of it


def test_one_run_preempted_four_ways_each_launch_resuming_the_last(demo_shards, tmp_path):
    """One run, stopped four ways in turn, each launch resuming where the last one's checkpoint left it:
    kill -9 of the launcher (its ranks go within seconds and nothing writes the run dir after); SIGTERM to the
    launcher and Ctrl-C to the process group (the step in flight is checkpointed, the exit is not 0); SIGUSR1 to
    one rank (every rank stops after the same step); then a plain resume finishes."""
    out = tmp_path / "run"
    args = common(demo_shards, out, "--max-steps", str(MAX_STEPS), "--epochs", "10", "--checkpoint-every", "2",
                  "--wandb", "off")

    def start(resume: bool, **popen):
        saved_before = steps_saved(out)[-1] if steps_saved(out) else 0
        proc = subprocess.Popen([*LAUNCH, *args, *(["--resume", "auto"] if resume else [])], cwd=REPO,
                                env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
        wait_for(lambda: steps_saved(out) and steps_saved(out)[-1] > saved_before,
                 what="this launch's first periodic checkpoint")
        return proc, saved_before

    # kill -9 of the launcher: its ranks die with it, and write nothing more
    proc, _ = start(resume=False)
    ranks = psutil.Process(proc.pid).children()
    assert len(ranks) == 2
    proc.kill()
    proc.communicate()
    t0 = time.time()
    _, alive = psutil.wait_procs(ranks, timeout=15)
    assert not alive, f"ranks still running {time.time() - t0:.1f}s after the launcher died"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    time.sleep(1.5)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before, "nothing may write the run dir after"
    assert not (out / "results.json").exists()

    # SIGTERM to the launcher, then Ctrl-C to the process group (the terminal signals the group)
    for sig, to_group in [(signal.SIGTERM, False), (signal.SIGINT, True)]:
        proc, resumed_from = start(resume=True, start_new_session=to_group)
        periodic = steps_saved(out)[-1]
        os.killpg(proc.pid, sig) if to_group else proc.send_signal(sig)
        log = proc.communicate(timeout=120)[0]
        assert proc.returncode != 0, "an interrupted job must not look finished"
        r = results(out)
        assert r["interrupted"] is True and f"{sig.name} received" in log
        assert "KeyboardInterrupt" not in log
        newest = steps_saved(out)[-1]
        assert periodic < newest == r["global_step"] < MAX_STEPS, (periodic, newest, log[-3000:])
        assert checkpoint.damage(out / "checkpoints" / f"step_{newest:08d}") is None
        assert r["resumed_from_step"] == resumed_from
        assert r["train_samples"] == (newest - resumed_from) * 16 and r["p_core"] >= r["p_train"] >= r["p_whole"] > 0

    # SIGUSR1 to one rank only, as a node-local preemption notice: every rank stops after the same step
    proc, _ = start(resume=True)
    ranks = psutil.Process(proc.pid).children()
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGUSR1)
    log = proc.communicate(timeout=120)[0]
    r = results(out)
    assert r["interrupted"] is True and "SIGUSR1 received" in log
    assert len(set(r["replica_checksums"])) == 1, "both ranks stopped after the same step"
    assert steps_saved(out)[-1] == r["global_step"] < MAX_STEPS

    newest = steps_saved(out)[-1]
    launch([*args, "--resume", "auto"])
    r = results(out)
    assert (r["resumed_from_step"], r["global_step"], r["interrupted"]) == (newest, MAX_STEPS, False)


# ---- 2. checkpoints you can trust ---------------------------------------------------------------
def test_resume_on_fewer_processes_then_past_damaged_checkpoints(demo_shards, tmp_path):
    """One run: 2 processes (ZeRO-2) to step 4; resumed on 1 process, through DeepSpeed's universal format, with
    the weights and the global batch kept, to step 6; the finished run left alone by another resume; then, its
    two newest checkpoints damaged, a 2-process resume skips each, naming it, for the newest intact one."""
    out = tmp_path / "run"
    args = common(demo_shards, out, "--checkpoint-every", "2", "--keep-checkpoints", "3", "--wandb", "off",
                  "--zero-stage", "2")
    launch([*args, "--max-steps", "4"])
    two = results(out)
    # as if the node was lost after the last checkpoint, before results.json (a finished run is not resumed)
    (out / "results.json").unlink()
    # one process resumes the 2-process ZeRO-2 checkpoint: converted to DeepSpeed's universal format
    proc = launch([*args, "--max-steps", "4", "--resume", "auto"], processes=1)
    assert "to DeepSpeed's universal checkpoint format" in proc.stdout
    one = results(out)
    assert (one["world_size"], one["resumed_from_step"], one["global_step"]) == (1, 4, 4)
    assert one["replica_checksums"] == two["replica_checksums"][:1], "the weights came through unchanged"
    launch([*args, "--max-steps", "6", "--resume", "auto"], processes=1)
    r = results(out)
    assert (r["resumed_from_step"], r["global_step"], r["global_batch_size"]) == (4, 6, 16)
    assert r["plan"]["grad_accum_steps"] == 2  # 16 = 8 x 1 process x 2: the global batch is kept
    # the same resume again: the run is finished, nothing is trained and nothing changes
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = launch([*args, "--max-steps", "6", "--resume", "auto"], processes=1)
    assert "the run finished at step 6 (trained all 6 steps); nothing to resume, nothing changed" in proc.stdout
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # the two newest checkpoints damaged (both written by the 1-process launches): step 6 the right size with
    # garbage content, step 4 missing its optimizer state; step 2 is the 2-process launch's
    assert steps_saved(out) == [2, 4, 6]
    ckpts = out / "checkpoints"
    model_file = ckpts / "step_00000006" / checkpoint.DS_TAG / "mp_rank_00_model_states.pt"
    model_file.write_bytes(os.urandom(model_file.stat().st_size))
    optim_state = next(rel for rel in checkpoint.read_marker(ckpts / "step_00000004")["files"] if "optim_states" in rel)
    (ckpts / "step_00000004" / optim_state).unlink()
    proc = launch([*args, "--max-steps", "8", "--resume", "auto"])
    warned = [line for line in proc.stderr.splitlines() if "skipping damaged checkpoint" in line]
    assert len(warned) == 2 and "step_00000006" in warned[0] and "step_00000004" in warned[1]
    assert "mp_rank_00_model_states.pt has other content than was written" in warned[0]
    assert f"{optim_state} is missing" in warned[1]
    r = results(out)
    assert (r["resumed_from_step"], r["global_step"]) == (2, 8)


def test_one_run_per_output_directory_and_a_dead_runs_lock_does_not_block(demo_shards, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([str(BIN / "python"), str(REPO / "train_vit.py"),
                              *common(demo_shards, out, "--max-steps", "100000", "--epochs", "10000",
                                      "--target-acc1", "101", "--wandb", "off")],  # runs until killed
                             cwd=REPO, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    wait_for(lambda: (out / ".lock").is_file() and "pid" in (out / ".lock").read_text(), what="the first run's lock")
    second = launch(common(demo_shards, out, "--max-steps", "2", "--wandb", "off"), processes=1, check=False)
    assert second.returncode == 2 and "is in use by a running training" in second.stderr
    assert f"pid {first.pid}" in second.stderr and first.poll() is None
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert (out / ".lock").is_file()
    launch(common(demo_shards, out, "--max-steps", "2", "--wandb", "off"), processes=1)
    assert results(out)["global_step"] == 2


@pytest.mark.parametrize("precision, log_interval", [("fp32", 1), ("amp", 100)])
def test_no_checkpoint_is_written_after_a_non_finite_loss(demo_shards, tmp_path, precision, log_interval):
    """amp: the loss scaler's skipped steps are excused, but a streak of them with non-finite losses is still
    divergence; fp32: a non-finite loss or gradient is. Never a run that exits 0 with checkpoints after it. The
    stop names the step wherever it is seen first: at a log row (fp32, every step logged) or at a checkpoint."""
    out = tmp_path / "run"
    proc = launch(common(demo_shards, out, "--lr", "1e30", "--max-steps", "8", "--checkpoint-every", "1",
                         "--log-interval", str(log_interval), "--wandb", "off", "--precision", precision),
                  check=False)
    found = re.search(r"error: non-finite loss (?:or gradients )?at step (\d+)", proc.stderr)
    assert found, proc.stderr[-3000:]
    bad_step = int(found[1])
    assert all(step < bad_step for step in steps_saved(out)), (steps_saved(out), bad_step)
    assert proc.returncode != 0 and not (out / "results.json").exists()


def test_read_only_output_dir_fails_at_start(demo_shards, tmp_path, small_fs):
    out = small_fs(1 << 20, ro=True) / "run"
    t0 = time.time()
    proc = launch(common(demo_shards, out, "--max-steps", "2", "--wandb", "off"), processes=1, check=False)
    assert proc.returncode == 2 and str(out) in proc.stderr and "Traceback" not in proc.stderr
    assert "cannot create the output directory or write in it" in proc.stderr
    # refused by the Plan, before accelerate or DeepSpeed set anything up (that took ~80 s of a real launch)
    assert "step 1/" not in proc.stdout and "device(s)" not in proc.stdout and time.time() - t0 < 30
