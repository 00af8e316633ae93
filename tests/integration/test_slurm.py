"""slurm/2x8.sbatch on a real SLURM: a one-node cluster started here (its own directory, munge key and ports),
the shipped batch script submitted in a one-node miniature (1 node, the CPU launch config, a tiny model),
preempted while it trains the way SLURM's --signal=B:USR1 timer does it, requeued, resumed and finished.

Where SLURM is not installed the test installs Debian's slurm-wlm and munge (as root with apt-get, as CI
runs); where it cannot, it is skipped saying why.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from vitbench import checkpoint
from vitbench.runinfo import free_port
from vitbench.tracking import METRICS_FILE

from conftest import BIN, REPO, TINY, base_env, info, results

pytestmark = pytest.mark.slow
CRED_EXPIRE_S = 10
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")


def ensure_slurm() -> None:
    if all(shutil.which(d) for d in DAEMONS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and this machine cannot install it (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"]
    proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:  # an old package list: refresh it once
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=900)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not all(shutil.which(d) for d in DAEMONS):
        pytest.skip(f"could not install SLURM with apt-get: {(proc.stderr or proc.stdout).strip()[-300:]}")


class Cluster:
    """One node, one partition: munged, slurmctld and slurmd in the foreground, stopped by their own PIDs."""

    def __init__(self, root: Path):
        self.root, self.procs = root, []
        self.host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool", "log"):
            (root / sub).mkdir()
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf = root / "slurm.conf"
        memory = psutil.virtual_memory().total // 2**20 - 1024
        self.conf.write_text("\n".join([
            "ClusterName=vitbench-test", f"SlurmctldHost={self.host}", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}", "MailProg=/bin/true",
            "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire: how long slurmd refuses a requeued job's new start ("Job credential revoked")
            f"AuthInfo=socket={root}/munge.sock,cred_expire={CRED_EXPIRE_S}",
            f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
            f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
            f"SlurmctldLogFile={root}/log/slurmctld.log", f"SlurmdLogFile={root}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "JobRequeue=1", "ReturnToService=2",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "KillWait=30", "MinJobAge=3600",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory}",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
        self.env = {**base_env(), "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        r = self.root
        self._daemon(["munged", "-F", "--force", f"--key-file={r}/munge.key", f"--socket={r}/munge.sock",
                      f"--pid-file={r}/munge.pid", f"--seed-file={r}/munge.seed", f"--log-file={r}/log/munged.log"])
        self._wait(lambda: (r / "munge.sock").exists(), "munged's socket")
        self._daemon(["slurmctld", "-D", "-f", str(self.conf)])
        self._daemon(["slurmd", "-D", "-f", str(self.conf)])
        self._wait(lambda: self.run(["sinfo", "-h", "-o", "%t"], check=False).stdout.strip() == "idle",
                   "the node to be idle")

    def _daemon(self, cmd) -> None:
        log = open(self.root / "log" / f"{cmd[0]}.out", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _wait(self, condition, what: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return
            if any(p.poll() is not None for p in self.procs):
                logs = "\n".join(f.read_text()[-1500:] for f in sorted((self.root / "log").iterdir()))
                raise AssertionError(f"a SLURM daemon exited while waiting for {what}:\n{logs}")
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")

    def run(self, cmd, check=True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 or not check, f"{cmd}: {proc.stderr}"
        return proc

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.run(["scontrol", "show", "job", job_id]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ensure_slurm()
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def wait_until(condition, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_preempted_job_checkpoints_requeues_resumes_and_trains_no_step_twice(cluster, demo_shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "slurm-%j.out"
    epochs = 20  # long enough to be preempted mid-way on any CPU (~10 s of steps here), evaluated at the end only
    steps = epochs * (info(demo_shards)["splits"]["train"]["num_samples"] // 16)
    env = {**cluster.env, "ACCELERATE_CONFIG": "accelerate_configs/cpu_1x2.yaml", "RUN_NAME": "slurm-mini",
           "OUTPUT_DIR": str(out), "VITBENCH_VENV": str(BIN.parent), "MAIN_PORT": str(free_port()),
           "CHECKPOINT_EVERY": "1000", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120", "PYTHONUNBUFFERED": "1"}  # the log shows each step as it ends
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={os.cpu_count()}",
         f"--output={log}", str(REPO / "slurm" / "2x8.sbatch"),
         *TINY, "--data-dir", str(demo_shards), "--batch-size", "8", "--global-batch-size", "16", "--mixup", "0",
         "--cutmix", "0", "--epochs", str(epochs), "--eval-every", str(epochs), "--log-interval", "1",
         "--wandb", "off"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    log_file = Path(str(log).replace("%j", job_id))

    def log_text():
        return log_file.read_text() if log_file.is_file() else ""

    # preempt while it trains, as --signal=B:USR1@N does: USR1 to the batch script only
    wait_until(lambda: re.search(r"^step [3-9]/", log_text(), re.M), "training to run", timeout=300)
    cluster.run(["scancel", "--signal=USR1", "--batch", job_id])
    wait_until(lambda: cluster.job(job_id).get("Restarts") == "1", "the job to be requeued", timeout=300)
    requeued = time.time()
    wait_until(lambda: cluster.job(job_id)["JobState"] != "COMPLETING", "the requeued job to be pending", timeout=120)
    first = log_text()  # the first run's whole log and checkpoint, read before the second run may start
    saved = checkpoint.complete_checkpoints(out / "checkpoints")
    # SLURM holds a requeued job ~121 s before it is eligible again (its own delay, not the script's): release
    # it, as an operator would, once its old credential has expired (earlier, slurmd kills the start as
    # "Job credential revoked"), so the test waits for the resume and not for the scheduler's clock
    time.sleep(max(0.0, requeued + CRED_EXPIRE_S + 2 - time.time()))
    cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)  # already running: fine
    assert len(saved) == 1, first[-3000:]
    stop_step = saved[0][0]
    assert 3 <= stop_step < steps
    assert f"checkpoint step {stop_step} saved; requeueing" in first
    assert "launcher exited 1 after a stop signal" in first  # torchrun's status; the node script exits 0
    assert first.count("SIGTERM received: stopping after this step with a checkpoint") >= 2  # both ranks

    wait_until(lambda: cluster.job(job_id)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"), "the job to end",
               timeout=600)
    job = cluster.job(job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log_text()[-3000:]
    r = results(out)
    assert (r["resumed_from_step"], r["global_step"], r["interrupted"]) == (stop_step, steps, False)
    assert f"resumed from {out}/checkpoints/step_{stop_step:08d} at step {stop_step}" in log_text()
    rows = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    trained = [row["step"] for row in rows if row["kind"] == "train"]
    assert trained == list(range(1, steps + 1)), "every step trained (and logged) exactly once"
