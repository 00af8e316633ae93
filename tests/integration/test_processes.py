"""What only a real process shows, one short process each (no training): a second stop signal ends a process
whose step never ends, prep_shards.py killed with SIGKILL resumes, prep in a C locale prints odd names, report.py
without a W&B login is one line, a bad flag answers before the heavy imports. The commands' logic is tested
in-process in tests/unit/."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from vitbench.data import demo

from conftest import BIN, REPO, base_env, info, run_env, tar_samples

pytestmark = pytest.mark.slow  # each starts a process


def test_a_second_stop_signal_ends_a_process_whose_step_never_ends():
    """The first SIGTERM asks for a checkpoint after the step; if the step never ends (a data wait on a hung
    filesystem), a second one later ends the process; copies a launcher forwards at once do not."""
    code = ("import os, signal, time\n"
            "from vitbench import lifecycle\n"
            "stop = lifecycle.StopRequest(1)\n"
            "os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGTERM)  # forwarded copy\n"
            "time.sleep(lifecycle.SECOND_SIGNAL_AFTER_S + 0.5)\n"
            "print('still waiting', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(60)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=run_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 128 + 15 and proc.stdout == "still waiting\n"
    assert proc.stderr.splitlines() == ["SIGTERM received: stopping after this step with a checkpoint",
                                        "second stop signal (SIGTERM): exiting now, without a checkpoint"]


PREP = [str(BIN / "python"), str(REPO / "prep_shards.py")]


def test_images_without_a_faithful_rgb_form_are_skipped_and_listed_and_odd_names_print_anywhere(imagefolder,
                                                                                                tmp_path):
    """A 16-bit image would become a constant RGB image; file names that are not UTF-8, colliding once made
    keys, still get their own keys, and the skipped list prints under LC_ALL=C."""
    import numpy as np
    from PIL import Image

    src = tmp_path / "src"
    shutil.copytree(imagefolder / "train", src)
    cls = sorted(d for d in src.iterdir())[0]
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(cls / "deep.png")
    jpeg = next(cls.glob("*.JPEG")).read_bytes()
    odd = [os.fsencode(str(cls)) + b"/caf\xe9.x.JPEG", os.fsencode(str(cls)) + b"/caf\xe9_x.JPEG",
           os.fsencode(str(cls)) + b"/caf\xe9\xff.JPEG"]
    for name in odd:
        with open(name, "wb") as f:
            f.write(jpeg if not name.endswith(b"\xff.JPEG") else b"garbage")
    env = {**base_env(), "LC_ALL": "C", "PYTHONIOENCODING": "", "PYTHONUTF8": "0"}
    proc = subprocess.run([*PREP, "--src", str(src), "--out", str(tmp_path / "out"), "--split", "train"],
                          capture_output=True, env=env)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    split = info(tmp_path / "out")["splits"]["train"]
    reasons = {s["path"].rsplit("/", 1)[1]: s["reason"] for s in split["skipped"]}
    assert "image mode I;16 has no faithful 8-bit RGB form" in reasons["deep.png"]
    assert len(reasons) == 2 and b"caf" in proc.stdout  # the garbage one, printed escaped
    keys = list(tar_samples(tmp_path / "out"))
    assert len(keys) == len(set(keys)) == split["num_samples"]


def test_prep_killed_with_sigkill_resumes_and_keeps_completed_shards(tmp_path):
    src = tmp_path / "src"
    demo.make_imagefolder(src, train_per_class=12, val_per_class=0, seed=5)
    out = tmp_path / "out"
    cmd = [*PREP, "--src", str(src / "train"), "--out", str(out), "--split", "train", "--shard-size", "2",
           "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / ".prep").glob("*.json"))) < 3:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name[:-5]: (out / p.name[:-5]).stat().st_mtime_ns for p in (out / ".prep").glob("*.json")}
    assert 3 <= len(done_before) < 60, "the kill must land mid-run"
    assert not (out / "_info.json").exists()

    subprocess.run(cmd, check=True, capture_output=True)
    for name, mtime in done_before.items():  # completed shards were kept, not rewritten
        assert (out / name).stat().st_mtime_ns == mtime
    assert not list(out.glob(".*.tmp*")), "no temporary shard may be left behind"
    assert subprocess.run([*PREP, "--out", str(out), "--split", "train", "--verify"]).returncode == 0
    samples = tar_samples(out)
    assert len(samples) == 120 == info(out)["splits"]["train"]["num_samples"]


def test_a_workspace_without_a_wandb_login_is_one_line(tmp_path):
    proc = subprocess.run([str(BIN / "python"), str(REPO / "report.py"), "--wandb-workspace", "team/proj"],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={"PATH": str(BIN), "HOME": str(tmp_path),
                               "WANDB_BASE_URL": "http://127.0.0.1:9"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --wandb-workspace team/proj: W&B did not")


def test_a_bad_flag_answers_before_the_heavy_imports():
    t0 = time.time()
    proc = subprocess.run([str(BIN / "python"), str(REPO / "train_vit.py"), "--warmup-lr", "1e-5"],
                          capture_output=True, text=True, cwd=REPO)
    elapsed = time.time() - t0
    assert proc.returncode == 2 and proc.stderr.startswith("error: --warmup-lr is not a flag")
    assert "deepspeed" not in proc.stderr.lower() and "Traceback" not in proc.stderr  # DeepSpeed was never imported
    assert elapsed < 15  # the parse itself is milliseconds; this bounds the imports before it on a busy machine

