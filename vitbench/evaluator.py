"""Evaluation: when it is due, and top-1/top-5/loss over every validation sample exactly once across ranks
(vitbench.data.validation reads each sample once; the sums are reduced over ranks; nothing is padded or dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from vitbench import metrics as M
from vitbench.data.validation import ValidationStream, validation_loader


@dataclass(frozen=True)
class EvalSpec:
    every_epochs: int  # evaluate after every N epochs (and at the end)
    batch_size: int
    target_acc1: float | None  # stop once top-1 reaches it


class Evaluator:
    """TO_INPUT: a worker batch -> the model's input on DEVICE (transforms.OnDevice). REDUCE_SUM: a tensor
    summed over ranks. LOCKSTEP: every rank runs as many forwards (ZeRO-3 gathers parameters inside forward), padded
with IMG_SIZE images whose outputs are discarded."""

    def __init__(self, spec: EvalSpec, stream: ValidationStream, to_input, *, device, total_steps: int,
                 reduce_sum: Callable[[torch.Tensor], torch.Tensor], lockstep: bool, img_size: int,
                 pin_memory: bool = False):
        self.spec, self.stream, self.to_input, self.device = spec, stream, to_input, device
        self.pin_memory = pin_memory  # the device layer's pins_memory
        self.total_steps, self.reduce_sum = total_steps, reduce_sum
        self.pad_to = img_size if lockstep else None
        self.evals: list[dict] = []  # one row per evaluation: epoch, step and the figures
        self.reached_target = False

    def due(self, step: int, step_in_epoch: int, epoch: int) -> bool:
        """After every `every_epochs` epochs (EPOCH counts those done; STEP_IN_EPOCH 0: one just ended) and at
        the last step."""
        return (step_in_epoch == 0 and epoch % self.spec.every_epochs == 0) or step >= self.total_steps

    @property
    def final(self) -> dict | None:
        return self.evals[-1] if self.evals else None

    def evaluate(self, model, epoch: int, step: int) -> dict:
        result = evaluate(model, self.stream, self.to_input, self.device, self.reduce_sum, self.pad_to,
                          self.pin_memory)
        self.evals.append({"epoch": epoch, "step": step, **result})
        target = self.spec.target_acc1
        self.reached_target = target is not None and result[M.ACC1] >= target
        return result


@torch.no_grad()
def evaluate(model, stream: ValidationStream, to_input, device, reduce_sum, pad_to: int | None = None,
             pin_memory: bool = False) -> dict:
    """Sums over this rank's part of the split, reduced over ranks. PAD_TO: run dummy forwards of that image size
    until this rank has run as many as the rank with the most batches."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top1, top5, count, skipped
    batches = 0
    skipped_only = 0  # samples dropped after a worker's last image come in a batch of no images
    for batch in validation_loader(stream, pin_memory=pin_memory):
        if batch["images"] is None:
            skipped_only += batch["skipped"]
            continue
        x, y = to_input(batch["images"], batch["labels"])
        logits = model(x).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.stack([
            torch.nn.functional.cross_entropy(logits, y, reduction="sum").double(),
            (top5[:, 0] == y).sum().double(),
            (top5 == y[:, None]).any(dim=1).sum().double(),
            torch.tensor(float(len(y)), dtype=torch.float64, device=device),
            torch.tensor(float(batch["skipped"]), dtype=torch.float64, device=device),
        ])
        batches += 1
    if pad_to:  # ZeRO-3 gathers parameters inside forward: every rank must run as many forwards
        pad = torch.zeros(1, 3, pad_to, pad_to, dtype=to_input.dtype, device=device)
        for _ in range(stream.max_batches_per_rank() - batches):
            model(pad)  # outputs discarded: padding is never counted
    sums[4] += skipped_only
    loss, top1, top5, count, skipped = reduce_sum(sums).tolist()
    model.train()
    return {M.ACC1: 100 * top1 / max(count, 1), M.ACC5: 100 * top5 / max(count, 1),
            M.VAL_LOSS: loss / max(count, 1), M.EVAL_SAMPLES: int(count), "skipped": int(skipped)}
