"""The few cross-rank questions the training story asks, each one collective (every rank calls it, or none does).
Without a process group (plain `python train_vit.py`) each answers for this process alone."""

from __future__ import annotations

import hashlib
import os

import torch


def is_node_leader() -> bool:
    """The first process of its node (LOCAL_RANK 0): what a node says once, it says from here. Readable before
    the process group exists."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def reduce_min(t: torch.Tensor) -> torch.Tensor:
    """T's smallest value over ranks (a copy; T is untouched)."""
    if torch.distributed.is_initialized():
        t = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return t


def reduce_max(values: list[float], device) -> list[float]:
    """Each of VALUES' largest value over ranks (the slowest rank's times)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def replica_checksums(module: torch.nn.Module, zero_stage: int) -> list[str] | None:
    """A digest of every rank's full weights (ZeRO 0-2 keep a full replica per rank): all equal, or a bug.
    None at ZeRO-3, where no rank holds the whole model."""
    from accelerate.utils import gather_object

    if zero_stage == 3:
        return None
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return gather_object([h.hexdigest()[:16]])
