"""Tracking that can never stop or slow a training run: every profiler row, evaluation and checkpoint
goes to OUTPUT_DIR/metrics.jsonl (always, so reports need neither a W&B server nor its binary files)
and to Weights & Biases.

One W&B run per launch, made on the main process only; every W&B call is guarded: the first failure
prints one warning and turns W&B off for the rest of the run.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from vitbench.errors import UserError
from vitbench.metrics import EPOCH, EVAL_PREFIX, STEP, TRAIN_PREFIX

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class TrackingSpec:
    mode: str  # "online" (offline when there are no credentials), "offline" or "off"
    project: str
    entity: str | None
    group: str | None  # None: the run name


def init_timeout(environ=os.environ) -> float:
    """WANDB_INIT_TIMEOUT (seconds W&B may take to start), checked before any work: a bad value would make
    W&B fail at start and the run keep no W&B files at all."""
    text = environ.get("WANDB_INIT_TIMEOUT", "30")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"WANDB_INIT_TIMEOUT={text!r} is not a number of seconds > 0; unset it (30 s) or fix it")
    return value


class Tracker:
    """Where SPEC says, on the main process (ENABLED): metrics.jsonl under RUN_DIR and a W&B run NAME."""

    def __init__(self, spec: TrackingSpec, *, enabled: bool, run_dir: Path, name: str, config: dict):
        self.run, self.mode, self.run_dir, self.jsonl = None, spec.mode, Path(run_dir), None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Appended (a resumed run adds to its rows) and flushed per row: a killed run keeps what it logged.
        self.jsonl = open(self.run_dir / METRICS_FILE, "a", buffering=1)
        if self.mode == "off":
            return
        where = (spec.project, spec.entity, name, spec.group or name, config)
        if self.mode == "online":
            try:
                self._init(*where)
                return
            except Exception as e:  # server unreachable, auth refused: keep the metrics in offline files
                self._close_quietly()
                self.mode = "offline"
                print(f"wandb: online start failed ({type(e).__name__}: {str(e)[:200]}); logging offline instead, "
                      f"upload later with `wandb sync {self.run_dir / 'wandb'}/offline-run-*`")
        self._guard("init", self._init, *where)

    def _init(self, project, entity, name, group, config):
        import wandb

        if self.mode == "online" and not wandb.login(prompt=False, verify=False):
            self.mode = "offline"
            print("wandb: no credentials found, logging offline; upload later with "
                  f"`wandb sync {self.run_dir / 'wandb'}/offline-run-*`")
        # W&B keeps debug logs and staged artifacts under ~ unless told otherwise: keep them in the run dir.
        os.environ.setdefault("WANDB_CACHE_DIR", str(self.run_dir / "wandb" / "cache"))
        os.environ.setdefault("WANDB_DATA_DIR", str(self.run_dir / "wandb" / "data"))
        self.run = wandb.init(project=project, entity=entity, name=name, group=group, config=config,
                              dir=str(self.run_dir), mode=self.mode, reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True,
                                                     init_timeout=init_timeout()))
        self.run.define_metric(f"{TRAIN_PREFIX}step")
        self.run.define_metric(f"{TRAIN_PREFIX}*", step_metric=f"{TRAIN_PREFIX}step")
        self.run.define_metric(f"{EVAL_PREFIX}epoch")
        self.run.define_metric(f"{EVAL_PREFIX}*", step_metric=f"{EVAL_PREFIX}epoch")
        if self.mode == "offline":
            print(f"wandb: offline run files in {self.run.dir}; upload with `wandb sync {Path(self.run.dir).parent}`")

    def _guard(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # a tracking failure must never stop training
            warnings.warn(f"wandb {what} failed ({type(e).__name__}: {e}); W&B logging is off for this run",
                          stacklevel=3)
            self._close_quietly()
            self.run = None

    def _close_quietly(self):
        try:
            if self.run is not None:
                self.run.finish(exit_code=1)
        except Exception:
            pass

    def _write(self, kind: str, step: int, row: dict) -> None:
        if not self.jsonl:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        try:
            self.jsonl.write(json.dumps({"kind": kind, STEP: step, "time": time.time(), **clean}) + "\n")
        except OSError as e:  # a full disk: the rows stop, the training (and its checkpoints) go on
            warnings.warn(f"{self.run_dir / METRICS_FILE}: {e.strerror or e}; {METRICS_FILE} rows stop here, "
                          "training goes on", stacklevel=2)
            self._close_jsonl()

    def _close_jsonl(self) -> None:
        jsonl, self.jsonl = self.jsonl, None
        try:
            if jsonl:
                jsonl.close()
        except OSError:
            pass

    def log_step(self, step: int, row: dict) -> None:
        self._write("train", step, row)
        if self.run:
            self._guard("log", self.run.log, {f"{TRAIN_PREFIX}{STEP}": step,
                                              **{f"{TRAIN_PREFIX}{k}": v for k, v in row.items()}})

    def log_eval(self, epoch: int, step: int, row: dict) -> None:
        self._write("eval", step, {EPOCH: epoch, **row})
        if self.run:
            self._guard("log", self.run.log, {f"{EVAL_PREFIX}{EPOCH}": epoch,
                                              **{f"{EVAL_PREFIX}{k}": v for k, v in row.items()}})

    def log_event(self, kind: str, step: int, row: dict | None = None) -> None:
        """A point in the run's timeline (a checkpoint save, with its cost): metrics.jsonl only."""
        self._write(kind, step, dict(row or {}))

    def abort(self) -> None:
        """The run ended with an error: close metrics.jsonl, mark the W&B run failed (no-op after finish)."""
        self._close_jsonl()
        self._close_quietly()
        self.run = None

    def finish(self, summary: dict, table: tuple[list, list], artifacts: list[Path] = ()) -> None:
        """SUMMARY: the run's figures; TABLE: (columns, row) of the results table."""
        self._close_jsonl()
        if self.run:
            self._guard("finish", self._finish, summary, table, artifacts)

    def _finish(self, summary, table, artifacts):
        import wandb

        self.run.summary.update(summary)
        columns, row = table
        self.run.log({"results": wandb.Table(columns=columns, data=[row])})
        for path in artifacts:
            art = wandb.Artifact(f"{self.run.id}-{path.name}", type="profile")
            art.add_dir(str(path)) if path.is_dir() else art.add_file(str(path))
            self.run.log_artifact(art)
        self.run.finish()
        self.run = None
