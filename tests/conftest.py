import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DATA = Path(__file__).resolve().parent / "data"  # recorded inputs (results files of real runs)
GOLDEN = Path(__file__).resolve().parent / "golden"  # expected outputs

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


# ---- real servers on loopback, serving the demo shards (vitbench/testing/servers.py) -------------------------
@pytest.fixture
def http(demo_shards):
    """serve(**faults) -> a threaded HTTP server of the demo shards under /wds (closed after the test)."""
    from vitbench.testing.servers import FileServer

    servers = []

    def serve(**kw):
        servers.append(FileServer(demo_shards, prefix="wds", **kw))
        return servers[-1]
    yield serve
    for s in servers:
        s.close()


@pytest.fixture(scope="module")
def s3(demo_shards):
    """moto's S3 server holding the demo shards: (server, the local copy)."""
    from vitbench.testing.servers import S3Server

    server = S3Server(demo_shards)
    yield server, demo_shards
    server.close()


def command(name: str):
    """A command at the repository's root (train_vit, report, prep_shards) as a module, loaded from its file (it is
    not part of the installed package), to call its functions in-process."""
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def run_command(name: str, *args) -> subprocess.CompletedProcess:
    """`NAME.py ARGS` in this process (report, prep_shards): main(ARGS)'s exit status, stdout and stderr, as the
    process would give them (argparse's exit included). The command's own code runs; only the interpreter start
    and the imports are saved. Tests that need the process itself (signals, locales) start it."""
    import contextlib
    import io

    module = command(name)
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True) for _ in range(2))
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = module.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    text = [s.buffer.getvalue().decode() for s in (out, err)]
    return subprocess.CompletedProcess([name, *args], code, *text)


# ---- an ImageFolder source and what a shard directory holds ----------------------------------------------
@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    """ILSVRC2012's layout in miniature (SRC/<wnid>/<image>.JPEG): 4 train and 2 validation images a class."""
    from vitbench.data import demo

    root = tmp_path_factory.mktemp("folder")
    demo.make_imagefolder(root, train_per_class=4, val_per_class=2, seed=3)
    return root


def tar_samples(path: Path) -> dict:
    """Every sample of a shard directory, read with webdataset: key -> sample dict."""
    import webdataset as wds

    out = {}
    for shard in sorted(path.glob("*.tar")):
        for s in wds.tariterators.tarfile_samples([{"url": str(shard)}]):
            assert s["__key__"] not in out
            out[s["__key__"]] = s
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
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])  # the venv's tools first, as once activated
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


# accelerate's own entry point for its launch command alone (accelerate.commands.launch:main). The `accelerate`
# dispatcher runs the same code but first imports every subcommand, and estimate-memory imports timm and
# transformers: ~3.5 s more per launch here. The demo and SLURM tests run `accelerate launch` as users type it.
ACCELERATE_LAUNCH = [str(BIN / "accelerate-launch")]
USER_LAUNCH = [str(BIN / "accelerate"), "launch"]


def _train_command(args, processes: int, launcher: list[str] = ACCELERATE_LAUNCH) -> list[str]:
    if processes == 1:
        return [str(BIN / "python"), str(REPO / "train_vit.py"), *args]
    return [*launcher, "--config_file", str(REPO / "accelerate_configs/cpu_1x2.yaml"),
            "--num_processes", str(processes), str(REPO / "train_vit.py"), *args]


def _check(proc, check: bool = True):
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def launch(args, *, processes: int = 2, timeout: int = 600, check: bool = True, env: dict | None = None,
           launcher: list[str] = ACCELERATE_LAUNCH):
    """train_vit.py under LAUNCHER on the CPU config (processes > 1) or plain python (1); ENV: extra
    environment variables."""
    proc = subprocess.run(_train_command(args, processes, launcher), cwd=REPO, env=run_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)
    return _check(proc, check)


def launch_together(runs: list[tuple[list[str], dict]], *, timeout: int = 600) -> None:
    """Several one-process runs (args, extra env) at once, each on one thread: only for runs whose assertions
    read no timing (losses, accuracy, files, requests), which do not depend on what else the machine runs."""
    procs = [subprocess.Popen(_train_command(args, 1), cwd=REPO, env=run_env(**env), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args, env in runs]
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            _check(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:  # one failed: the others are not left running
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def launch_machines(args, *, machines: int = 2, timeout: int = 600) -> None:
    """`machines` machines x 1 process in miniature: one `accelerate launch` per machine rank, main on 127.0.0.1."""
    from vitbench.runinfo import free_port

    port = str(free_port())
    procs = [subprocess.Popen(
        [*ACCELERATE_LAUNCH, "--config_file", str(REPO / "accelerate_configs/cpu_1x2.yaml"),
         "--num_machines", str(machines), "--num_processes", str(machines), "--machine_rank", str(rank),
         "--main_process_ip", "127.0.0.1", "--main_process_port", port, str(REPO / "train_vit.py"), *args],
        cwd=REPO, env=run_env(GLOO_SOCKET_IFNAME="lo"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(machines)]  # "machines" on one host: the process groups on loopback, as named
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * machines, "\n".join(o[-3000:] for o in outputs)


# ---- launches several test modules share -----------------------------------------------------------------
def sixteen_bit() -> str:
    """bf16 where DeepSpeed's accelerator reports it, else amp: the test asks the machine."""
    from deepspeed.accelerator import get_accelerator

    return "bf16" if get_accelerator().is_bf16_supported() else "amp"


# The shared runs: the recipe shortened to two epochs of the demo's 120 train images at global batch 16, every
# step logged, a checkpoint every 2 steps, W&B offline, a given peak (CPUs have no entry in the peak table).
SHARED_STEPS = 2 * (120 // 16)
SHARED_TIMING_WARMUP = 2  # steps left out of the steady figures
SHARED_PEAK = 0.5  # TFLOP/s per device, --peak-tflops


def shared_args(demo_shards, out: Path, name: str, *extra) -> list[str]:
    """The shared runs' flags (EXTRA last: what it sets wins); another run made with them differs from those
    in EXTRA only."""
    return [*TINY, "--data-dir", str(demo_shards), "--output-dir", str(out), "--run-name", name, "--batch-size", "8",
            "--global-batch-size", "16", "--mixup", "0", "--cutmix", "0", "--smoothing", "0", "--lr", "2e-3",
            "--warmup-epochs", "0.5", "--epochs", "2", "--log-interval", "1",
            "--timing-warmup-steps", str(SHARED_TIMING_WARMUP), "--checkpoint-every", "2", "--wandb", "offline",
            "--peak-tflops", str(SHARED_PEAK), *extra]


@pytest.fixture(scope="session")
def shared_runs(demo_shards, tmp_path_factory):
    """Five runs that several integration modules read, each launched once: the study's layouts
    (test_study.py), the two-rank ZeRO-1/2 runs and the two machines in miniature (test_trainer.py), the base and
    the 16-bit run of the comparisons (test_compare_runs.py)."""
    root = tmp_path_factory.mktemp("shared")
    # name: (machines, processes per machine, precision, ZeRO stage)
    layouts = {"a_1p_fp32_z1": (1, 1, "fp32", 1), "b_2p_fp32_z1": (1, 2, "fp32", 1),
               "c_2p_fp32_z2": (1, 2, "fp32", 2), "d_2p_16bit_z1": (1, 2, sixteen_bit(), 1),
               "e_2m_fp32_z1": (2, 1, "fp32", 1)}
    dirs = {}
    for name, (machines, processes, prec, stage) in layouts.items():
        dirs[name] = root / name
        args = shared_args(demo_shards, dirs[name], name, "--precision", prec, "--zero-stage", str(stage))
        launch_machines(args, machines=machines) if machines > 1 else launch(args, processes=processes)
    return dirs


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
