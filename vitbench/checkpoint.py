"""Complete-or-ignored checkpoints on top of accelerate's state saving (DeepSpeed checkpoints inside).

Every rank saves into `step_NNNNNNNN.tmp/` and fsyncs what it wrote; after all ranks are done the main
process writes a `COMPLETE` marker (the step, the layout, and the size of every file) and renames the
folder to `step_NNNNNNNN/` (one atomic rename). A run killed or out of space while saving leaves only a
`.tmp` folder, which resume ignores and the next save removes; the previous checkpoint is never touched.

`--resume auto` takes the newest complete checkpoint whose files are all there with their recorded sizes and
CRC-32s; a damaged one is reported in one line and skipped for the next older. A checkpoint written by another
number of processes is converted once to DeepSpeed's universal format (ZeRO 1-2) and loaded from that,
so a run that lost a node goes on with the same global batch.
Multi-node runs need the output directory on a shared filesystem, as DeepSpeed's ZeRO checkpoints do.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vitbench.errors import UserError
from vitbench.files import fsync, fsync_tree, loads

MARKER = "COMPLETE"
CHECKPOINTS_DIR = "checkpoints"  # under a run's output directory
UNIVERSAL = "universal"  # subfolder of a checkpoint: its DeepSpeed-universal conversion
DS_TAG = "pytorch_model"  # the folder accelerate gives the DeepSpeed engine's checkpoint
_NAME = re.compile(r"^step_(\d{8})$")
GIB = 1024**3


class CheckpointError(UserError):
    pass


@dataclass(frozen=True)
class CheckpointSpec:
    every_steps: int  # optimizer steps between checkpoints; 0: at the end only
    keep: int  # complete checkpoints kept (older ones are removed after a save)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under ROOT, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _NAME.match(d.name)
        if m and (d / MARKER).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def read_marker(path: Path) -> dict | None:
    """The checkpoint's marker, or None when it cannot be read."""
    try:
        meta = loads((Path(path) / MARKER).read_text())
        return meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None


def damage(path: Path) -> str | None:
    """Why the checkpoint at PATH would not load (a file missing, of another size or content than written), or
    None."""
    meta = read_marker(path)
    if meta is None:
        return f"its {MARKER} marker is unreadable"
    if "files" not in meta:
        return None  # a marker from before file lists were recorded
    for rel, size in meta["files"].items():
        f = Path(path) / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} were written"
    for rel, crc in meta.get("crc32", {}).items():  # the right sizes, but what is in them?
        if _crc32(Path(path) / rel) != crc:
            return f"{rel} has other content than was written (CRC-32 differs)"
    return None


def _crc32(path: Path) -> int:
    """A file's CRC-32, read in 16 MiB blocks (zlib: several GB/s, so checking a checkpoint costs seconds)."""
    import zlib

    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc


def resolve_resume(resume: str, root: Path, log=print) -> Path | None:
    """`--resume auto`: the newest complete checkpoint under ROOT that is intact, or None when there is
    none at all; `--resume PATH`: that one, which must be intact."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / MARKER).is_file():
            raise CheckpointError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
        if problem := damage(path):
            raise CheckpointError(f"{path}: damaged checkpoint ({problem})")
        return path
    found = complete_checkpoints(root)
    for _, path in reversed(found):
        problem = damage(path)
        if problem is None:
            return path
        log(f"warning: skipping damaged checkpoint {path} ({problem}); trying the one before it")
    if found:
        raise CheckpointError(f"{root}: none of the {len(found)} complete checkpoint(s) is intact; "
                              "start without --resume or restore one")
    return None


def check_layout(meta: dict, *, world_size: int, zero_stage: int, global_batch: int, precision: str,
                 model: dict | None = None) -> bool:
    """Whether resuming from a checkpoint with META needs the universal conversion; raise when the resume
    cannot work at all, saying what differs between the checkpoint (its marker records what it was made
    with) and this launch. MODEL: {"model", "model_kwargs"} of this launch. Called before any heavy work."""
    if not (meta or {}).get("world_size"):
        return False
    made_with = {k: meta[k] for k in ("model", "model_kwargs") if k in meta}
    wanted = json.loads(json.dumps({k: (model or {}).get(k) for k in made_with}))  # as the marker stores it
    if model and made_with and made_with != wanted:
        raise CheckpointError(f"the checkpoint holds {made_with.get('model')} built with "
                              f"{made_with.get('model_kwargs')}, this launch builds {model['model']} with "
                              f"{model['model_kwargs']}: resume with the --model, --img-size, --patch-size and "
                              "--model-kwargs (and the data's classes) it was trained with")
    saved = (meta["world_size"], meta.get("zero_stage"), meta.get("global_batch_size"), meta.get("precision"))
    if saved[2] not in (None, global_batch):
        raise CheckpointError(f"the checkpoint was trained with --global-batch-size {saved[2]}, this launch has "
                              f"{global_batch}: resume keeps the global batch (accumulation is re-derived)")
    if saved[3] not in (None, precision):
        raise CheckpointError(f"the checkpoint was trained with --precision {saved[3]}, this launch has "
                              f"--precision {precision}")
    if saved[0] == world_size and saved[1] == zero_stage:
        return False
    if saved[0] == world_size:
        raise CheckpointError(f"the checkpoint was written with ZeRO-{saved[1]}, this launch has ZeRO-{zero_stage} on "
                              f"as many processes ({world_size}): resume with --zero-stage {saved[1]}")
    # ZeRO-0 keeps the whole optimizer state on every rank, bf16 included (DeepSpeed >= 0.17.6 gives bf16 at
    # ZeRO-0 a non-partitioned optimizer unless fp32 gradient accumulation is asked for).
    if not {saved[1], zero_stage} & {1, 2, 3}:
        return False
    if 3 in (saved[1], zero_stage):
        raise CheckpointError(f"the checkpoint was written by {saved[0]} processes with ZeRO-{saved[1]}, this "
                              f"launch has {world_size} processes with ZeRO-{zero_stage}: ZeRO-3 checkpoints can "
                              f"only be resumed on the same layout here; relaunch with {saved[0]} processes")
    return True


def check_data(meta: dict | None, data: dict) -> None:
    """A checkpoint resumes only on the data it was trained on: the same `_info.json` (its sha256), wherever it
    is read from now (a local copy of shards that were on S3 is the same data)."""
    made_on = (meta or {}).get("data")
    if made_on and made_on.get("info_sha256") != data.get("info_sha256"):
        def name(d):
            return f"{d.get('source')}" + (f"@{d['revision']}" if d.get("revision") else "") + \
                f" (_info.json sha256 {str(d.get('info_sha256'))[:12]})"
        raise CheckpointError(f"the checkpoint was trained on {name(made_on)}, this launch reads {name(data)}: "
                              "resume on the same data, or start a new run")


def to_universal(path: Path, log=print) -> Path:
    """Convert the checkpoint at PATH once into DeepSpeed's universal format at PATH/universal (kept for
    later resumes; removed with the checkpoint). Run on the main process only."""
    out = Path(path) / UNIVERSAL
    if (out / MARKER).is_file():
        return out
    tmp = Path(path) / f"{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"converting {path} to DeepSpeed's universal checkpoint format (the number of processes changed)")
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                           "--input_folder", str(Path(path) / DS_TAG), "--output_folder", str(tmp / DS_TAG),
                           "--num_extract_workers", "2", "--num_merge_workers", "1", "--inject_missing_state"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        raise CheckpointError(f"{path}: DeepSpeed's universal conversion failed ({tail[0]})")
    for f in Path(path).iterdir():  # accelerate's own files: scheduler, train state, RNG states
        if f.is_file() and f.suffix in (".pkl", ".bin", ".safetensors"):
            shutil.copy2(f, tmp / f.name)
    (tmp / MARKER).write_text("{}")
    os.replace(tmp, out)
    return out


def _sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def _space_problem(root: Path, need: int, step: int, previous: str) -> str | None:
    free = shutil.disk_usage(root).free
    if free >= need:
        return None
    return (f"not enough space under {root} for checkpoint step {step}: {free / GIB:.3f} GiB free, about "
            f"{need / GIB:.3f} GiB needed; {previous}")


def _warn_if_next_will_not_fit(root: Path, step: int, size: int) -> None:
    """Warned one save early, while the run can still be given room (or a --keep-checkpoints change)."""
    free = shutil.disk_usage(root).free
    if free < size:
        print(f"warning: only {free / GIB:.3f} GiB free under {root} after checkpoint step {step} "
              f"({size / GIB:.3f} GiB): the next save will not fit unless room is made", file=sys.stderr)


def _previous_text(root: Path) -> str:
    found = complete_checkpoints(root)
    return f"the previous checkpoint step {found[-1][0]} is intact" if found else "no checkpoint was written yet"


def save(accelerator, root: Path, step: int, keep: int, meta: dict, min_bytes: int = 0) -> Path:
    """Save a checkpoint of STEP on every rank together; raise CheckpointError (same on every rank where
    it can be agreed) when the disk cannot take it. MIN_BYTES: the least a first checkpoint needs."""
    import torch

    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f"{final.name}.tmp"
    problem = None
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        found = complete_checkpoints(root)
        last = sum((read_marker(found[-1][1]) or {}).get("files", {}).values()) if found else 0
        problem = _space_problem(root, max(last, min_bytes), step, _previous_text(root))
        if problem is None:
            tmp.mkdir(parents=True)
    flag = torch.tensor([float(problem is not None)], device=accelerator.device)
    if accelerator.reduce(flag, reduction="sum").item():  # every rank reaches this: all stop together
        raise CheckpointError(problem or "the main process found no room for the checkpoint")
    try:
        accelerator.save_state(str(tmp))
        fsync_tree(tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        # A rank whose write fails stops here; the launcher ends the others. Nothing half-written is
        # ever complete: the .tmp folder has no marker and the next save removes it.
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(root).free < 64 << 20
        what = "no space left on device" if full else f"{type(e).__name__}: {str(e)[:200]}"
        raise CheckpointError(f"{what} writing checkpoint step {step} under {root}; "
                              f"{_previous_text(root)}") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        sizes = _sizes(tmp)
        marker = {"step": step, **meta, "files": sizes, "crc32": {rel: _crc32(tmp / rel) for rel in sizes}}
        with open(tmp / MARKER, "w") as f:
            json.dump(marker, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync(root)
        for _, old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        _warn_if_next_will_not_fit(root, step, sum(marker["files"].values()))
    accelerator.wait_for_everyone()
    return final


def identity(plan) -> dict:
    """What a checkpoint's marker records of the launch that wrote it (PLAN: a plan.Plan), and so what a resume
    is checked against (check_layout, check_data): the layout, the precision, the global batch, the model, the
    data."""
    return {"world_size": plan.world_size, "zero_stage": plan.zero_stage, "precision": plan.precision.label,
            "global_batch_size": plan.recipe.global_batch_size, "model": plan.model,
            "model_kwargs": plan.model_kwargs, "data": plan.data}


class CheckpointManager:
    """A run's checkpoints: when one is due, saving it (complete-or-ignored, rotated), the launch's choice of
    checkpoint agreed by every rank, and loading it. MIN_BYTES: the least the first save needs (no earlier
    checkpoint's size is known yet). BROADCAST: rank 0's list to every rank (accelerate's
    broadcast_object_list)."""

    def __init__(self, spec: CheckpointSpec, root: Path, accelerator, *, total_steps: int, meta: dict,
                 min_bytes: int, broadcast: Callable[[list], list]):
        self.spec, self.root, self.accelerator = spec, Path(root), accelerator
        self.total_steps, self.meta, self.min_bytes, self.broadcast = total_steps, meta, min_bytes, broadcast
        self.saves: list[dict] = []  # every save of this launch: {step, seconds, bytes} (bytes: main process)

    @classmethod
    def for_plan(cls, plan, out_dir: Path, accelerator, broadcast: Callable[[list], list]) -> "CheckpointManager":
        """The run's checkpoints under OUT_DIR/checkpoints, as PLAN (a plan.Plan) decided them."""
        return cls(plan.checkpoints, Path(out_dir) / CHECKPOINTS_DIR, accelerator, total_steps=plan.total_steps,
                   meta=identity(plan), broadcast=broadcast,
                   min_bytes=12 * plan.n_params)  # the first save's free-space floor: fp32 weights + two Adam moments

    def due(self, step: int) -> bool:
        """A periodic save after STEP (the end of training always saves, outside this rule)."""
        every = self.spec.every_steps
        return bool(every) and step % every == 0 and step < self.total_steps

    def save(self, step: int, epoch: int) -> Path:
        """Save STEP; what it cost, {step, seconds, bytes}, is appended to `saves` (results.json's checkpoint_time
        sums them: periodic, preemption and final saves alike)."""
        start = time.perf_counter()
        final = save(self.accelerator, self.root, step, keep=self.spec.keep, meta={"epoch": epoch, **self.meta},
                     min_bytes=self.min_bytes)
        cost = {"step": step, "seconds": time.perf_counter() - start,
                "bytes": sum(_sizes(final).values()) if self.accelerator.is_main_process else None}
        self.saves.append(cost)
        return final

    def agree_on_resume(self, resume_from: Path | None) -> None:
        """Rank 0's choice of checkpoint is the launch's: a rank that sees another (an output directory that is
        not one shared filesystem, a checkpoint written meanwhile) stops the launch instead of loading it."""
        chosen = self.broadcast([str(resume_from)])[0]
        if chosen != str(resume_from):
            raise CheckpointError(
                f"rank {self.accelerator.process_index} would resume from {resume_from}, rank 0 from {chosen}: "
                "every node must see the same --output-dir (a shared filesystem)")

    def load(self, resume_from: Path, universal: bool) -> None:
        """Everything registered with the accelerator, from RESUME_FROM (through its universal conversion when
        another number of processes wrote it)."""
        accelerator, load_from = self.accelerator, resume_from
        if universal:
            if accelerator.is_main_process:
                to_universal(resume_from, log=accelerator.print)
            accelerator.wait_for_everyone()
            load_from = resume_from / UNIVERSAL
        try:
            accelerator.load_state(str(load_from))
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {resume_from} does not load into this launch ({type(e).__name__}: {str(e)[:300]}); "
                f"its {MARKER} file records the settings it was written with") from None

