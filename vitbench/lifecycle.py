"""What keeps a day-long run safe on a shared cluster: one run per output directory, a clean stop on
preemption signals, and no rank left running when its launcher is gone.

Exit statuses of a rank (README "What happens when..."):
  0   finished            2   bad input or a clear error (nothing done is lost)
  75  interrupted by SIGTERM/SIGUSR1/SIGINT (Ctrl-C) after saving a checkpoint of the step it was in (EX_TEMPFAIL:
      relaunch with --resume auto)
  76  its launcher died (kill -9, node agent gone): it exited without writing anything more
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from vitbench.checkpoint import CHECKPOINTS_DIR, complete_checkpoints
from vitbench.errors import UserError
from vitbench.files import loads, writable_problem
from vitbench.results import RESULTS_FILE

EXIT_INTERRUPTED = 75
EXIT_ORPHANED = 76
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # SIGINT: Ctrl-C reaches every rank
# A stop signal this long after the first ends the process at once (the shell's 128 + signal number).
SECOND_SIGNAL_AFTER_S = 5.0
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class LockError(UserError):
    pass


class RunLock:
    """An exclusive lock on OUTPUT_DIR/.lock for the whole run (main process only). The kernel drops it
    when the process dies, so a stale lock of a dead run never blocks; on NFS flock maps to POSIX locks."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".lock"
        try:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a `.lock` that is a symlink is refused, never written through to its target.
            self.file = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise LockError(f"{self.path} is a symbolic link; the run lock is never written through a link: "
                                "remove it or pick another --output-dir") from None
            raise LockError(f"{out_dir}: cannot create the output directory or write in it "
                            f"({e.strerror or e}); pick a writable --output-dir") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise LockError(f"{out_dir} is in use by a running training ({holder}); give this run its own "
                            "--output-dir, or wait for that one to end") from None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
            # Lustre without `-o flock`, some FUSE mounts: run on, unguarded, and say so once.
            print(f"warning: {out_dir}: this filesystem cannot lock files ({e.strerror}); a second run started "
                  "in the same --output-dir will not be refused", file=sys.stderr)
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()
        if problem := writable_problem(out_dir):  # the directory must take real writes, not just a lock file
            raise LockError(f"{out_dir}: not writable ({problem}); pick a writable --output-dir")


# ---- What an output directory holds: the verdicts the Plan acts on before RunLock takes the directory ----
def _results(out_dir: Path) -> dict | None:
    try:
        r = loads((Path(out_dir) / RESULTS_FILE).read_text())
        return r if isinstance(r, dict) else None
    except (OSError, ValueError):
        return None


def held_run(out_dir: Path) -> str | None:
    """What of an earlier run OUT_DIR holds (its results file, complete checkpoints), or None: a new run there is
    refused (the Plan), so that nothing a user made is overwritten."""
    held = []
    if (r := _results(out_dir)) is not None:
        held.append(f"{RESULTS_FILE} of {'an interrupted' if r.get('interrupted') else 'a finished'} run, step "
                    f"{r.get('global_step')}")
    if found := complete_checkpoints(Path(out_dir) / CHECKPOINTS_DIR):
        held.append(f"checkpoint step {found[-1][0]}")
    return "; ".join(held) or None


def finished_run(out_dir: Path, total_steps: int) -> str | None:
    """For a resume: what to say when OUT_DIR's run already finished (its results file is not an interrupted
    run's, and it reached the steps asked for or its target), or None when there is training left."""
    r = _results(out_dir)
    if r is None or r.get("interrupted") or not (r.get("global_step", 0) >= total_steps or r.get("reached_target")):
        return None
    why = "reached its target top-1" if r.get("reached_target") else f"trained all {total_steps} steps"
    return (f"{out_dir}: the run finished at step {r.get('global_step')} ({why}); nothing to resume, nothing "
            "changed (a longer run: raise --epochs or --max-steps)")



class StopRequest:
    """SIGTERM, SIGUSR1 or SIGINT on any rank asks every rank to stop after the same step.

    The handler only sets a flag. Each step every rank starts a non-blocking all-reduce (MAX) of its
    flag on a CPU (gloo) group and reads the one it started the step before, so the hot path never
    waits on it and all ranks see the same answer at the same step."""

    def __init__(self, world_size: int):
        import torch.distributed as dist

        self.signal_name: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        self.group = dist.new_group(backend="gloo") if world_size > 1 and dist.is_initialized() else None
        self._pending = None

    def _on_signal(self, signum, _frame):
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name, self._first_signal_t = name, time.monotonic()
            print(f"{name} received: stopping after this step with a checkpoint", file=sys.stderr, flush=True)
        elif time.monotonic() - self._first_signal_t > SECOND_SIGNAL_AFTER_S:
            # A step that never ends (a data wait on a hung filesystem) would ignore the first one forever. The
            # copies a launcher forwards arrive within milliseconds and are not taken for a second request.
            print(f"second stop signal ({name}): exiting now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)

    def agreed(self) -> bool:
        """Called once per step on every rank: True when some rank was signalled (seen one step late)."""
        import torch
        import torch.distributed as dist

        if self.group is None:
            return self.signal_name is not None
        stop = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            stop = bool(flag.item())
        flag = torch.tensor([int(self.signal_name is not None)], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return stop

    def finish(self) -> None:
        """Wait for the all-reduce still in flight, so every rank leaves the loop with none pending."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def ignore_stop_signals() -> None:
    """For DataLoader workers: torchrun signals the rank's whole process group, and a worker that died
    of it would take the batch the rank needs to finish its last step."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def exit_with_launcher(interval: float = 0.5) -> None:
    """Under a launcher (torchrun sets TORCHELASTIC_RUN_ID), exit within about a second once it is gone,
    instead of running on and writing the output directory with nobody to stop us."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        print(f"rank {os.environ.get('RANK', '?')}: the launcher (pid {parent}) is gone; exiting",
              file=sys.stderr, flush=True)
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()
