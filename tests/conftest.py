import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# A ViT small enough for CPU tests: 32 px, patch 8 (16 tokens), 2 blocks.
TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8", "--model-kwargs", "depth=2",
        "--precision", "fp32", "--workers", "1", "--aa", "", "--eval-batch-size", "16", "--seed", "0"]


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """A small demo set: 10 classes x 12 train / 5 validation images; shards of 7 (uneven last shards)."""
    from vitbench.data import demo

    out = tmp_path_factory.mktemp("demo") / "shards"
    demo.build(out, train_per_class=12, val_per_class=5, shard_size=7, progress=False)
    return out


def info(path: Path) -> dict:
    return json.loads((Path(path) / "_info.json").read_text())


# The in-process process group (one_rank_group) sets these for the session; a launched run must not inherit them.
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def base_env() -> dict:
    """This process's environment without the in-process group's variables: what a launched process gets."""
    return {k: v for k, v in os.environ.items() if k not in DIST_VARS}


def run_env(**extra) -> dict:
    env = base_env()
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def launch(args, *, processes: int = 2, timeout: int = 600, check: bool = True, env: dict | None = None):
    """`accelerate launch` train_vit.py on the CPU config (processes > 1) or plain python (1); ENV: extra
    environment variables."""
    if processes == 1:
        cmd = [str(BIN / "python"), str(REPO / "train_vit.py"), *args]
    else:
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "accelerate_configs/cpu_1x2.yaml"),
               "--num_processes", str(processes), str(REPO / "train_vit.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(**(env or {})), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def launch_machines(args, *, machines: int = 2, timeout: int = 600) -> None:
    """`machines` machines x 1 process in miniature: one `accelerate launch` per machine rank, main on 127.0.0.1."""
    from vitbench.runinfo import free_port

    port = str(free_port())
    procs = [subprocess.Popen(
        [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "accelerate_configs/cpu_1x2.yaml"),
         "--num_machines", str(machines), "--num_processes", str(machines), "--machine_rank", str(rank),
         "--main_process_ip", "127.0.0.1", "--main_process_port", port, str(REPO / "train_vit.py"), *args],
        cwd=REPO, env=run_env(GLOO_SOCKET_IFNAME="lo"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(machines)]  # "machines" on one host: the process groups on loopback, as named
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * machines, "\n".join(o[-3000:] for o in outputs)


def results(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "results.json").read_text())


def _inspect(out_dir: Path, *flags) -> str:
    """Read the run's offline W&B file back with wandb's own tooling (`wandb leet inspect`)."""
    (run_dir,) = (Path(out_dir) / "wandb").glob("offline-run-*")
    proc = subprocess.run([str(BIN / "wandb"), "leet", "inspect", *flags, "--json", str(run_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def wandb_records(out_dir: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in _inspect(out_dir).splitlines() if line.strip().startswith("{")]
    return [r[kind] for r in records if r.get("type") == kind]


def wandb_history(out_dir: Path) -> list[dict]:
    return [h["item"] for h in wandb_records(out_dir, "history")]


def wandb_summary(out_dir: Path) -> dict:
    return json.loads(_inspect(out_dir, "--summary"))


@pytest.fixture
def small_fs(tmp_path):
    """mount(size, ro=False) -> a fresh tmpfs of SIZE bytes (a real full disk / read-only filesystem);
    unmounted at the end. Skips where this machine does not let the tests mount (not root)."""
    mounts = []

    def mount(size: int, ro: bool = False) -> Path:
        where = tmp_path / f"fs{len(mounts)}"
        where.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
        mounts.append(where)
        return where

    yield mount
    for where in reversed(mounts):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount(where: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


def copy_shards(src: Path, dst: Path) -> Path:
    """A private copy of a shard directory, for tests that damage it."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("src", ".prep"))
    return dst


def write_info(path: Path, meta: dict) -> None:
    (Path(path) / "_info.json").write_text(json.dumps(meta))


def assert_picture(path):
    """A PNG that holds a drawing: the right signature, some size, and more than a few colours."""
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 15_000, path
    pixels = imread(path)[..., :3].reshape(-1, 3)
    assert len({tuple(p) for p in pixels[::7]}) > 50, f"{path} looks blank"


@pytest.fixture(scope="session")
def one_rank_group():
    """A one-process gloo group in this process, so that real DeepSpeed engines can be built in-process (one
    per session: DeepSpeed keeps the first group it sees)."""
    import os

    import torch.distributed as dist

    from vitbench.runinfo import free_port

    saved = {k: os.environ.get(k) for k in DIST_VARS}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
