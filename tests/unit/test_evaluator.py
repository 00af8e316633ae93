"""The evaluator (vitbench/evaluator.py): due every N epochs and at the last step, every validation sample
counted once across ranks, the target seen, ZeRO-3's lockstep forwards."""

from collections import Counter

import pytest
import torch

from vitbench import metrics as M
from vitbench.data import shardread
from vitbench.data.shardformat import load_split, parse_label
from vitbench.data.transforms import OnDevice, eval_transform
from vitbench.data.validation import ValidationStream
from vitbench.evaluator import EvalSpec, Evaluator


def evaluator(val, spec=EvalSpec(2, 7, 50.0), workers=2, lockstep=False, total=20):
    stream = ValidationStream(val, eval_transform(32), spec.batch_size, rank=0, world_size=1, workers=workers)
    return Evaluator(spec, stream, OnDevice(torch.device("cpu"), torch.float32), device="cpu", total_steps=total,
                     reduce_sum=lambda t: t, lockstep=lockstep, img_size=32)


def test_evaluation_is_due_every_n_epochs_and_at_the_last_step(demo_shards):
    ev = evaluator(load_split(demo_shards, "validation"), EvalSpec(2, 7, None), total=20)
    assert [ev.due(step, 0, epoch) for step, epoch in [(5, 1), (10, 2), (15, 3), (20, 4)]] == [False, True, False,
                                                                                              True]
    assert not ev.due(11, 1, 2)  # inside an epoch
    assert ev.due(20, 3, 4)  # the last step, whatever the epoch


class Constant(torch.nn.Module):
    """Predicts class ORDER[0] first, ORDER[1] second, ...: its top-1 and top-5 follow from the labels alone."""

    def __init__(self, order, num_classes):
        super().__init__()
        self.logits = torch.zeros(num_classes)
        self.logits[list(order)] = torch.arange(len(order), 0, -1, dtype=torch.float)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.logits.expand(len(x), -1)


def test_every_validation_sample_is_counted_once_and_the_target_is_seen(demo_shards):
    val = load_split(demo_shards, "validation")
    labels = [parse_label(s["cls"], val.num_classes) for url in val.urls
              for s in shardread.tar_samples(url, shardread.SkipLog())]
    order = [c for c, _ in Counter(labels).most_common()]
    model = Constant(order, val.num_classes)
    ev = evaluator(val, EvalSpec(1, 7, 100 * Counter(labels)[order[0]] / len(labels)))
    result = ev.evaluate(model, epoch=1, step=5)
    assert result[M.EVAL_SAMPLES] == val.num_samples == len(labels) and result["skipped"] == 0
    assert result[M.ACC1] == pytest.approx(100 * Counter(labels)[order[0]] / len(labels))
    assert result[M.ACC5] == pytest.approx(100 * sum(Counter(labels)[c] for c in order[:5]) / len(labels))
    assert ev.reached_target and ev.final == {"epoch": 1, "step": 5, **result}
    assert model.training  # handed back in training mode


def test_lockstep_runs_as_many_forwards_as_the_busiest_rank(demo_shards):
    """ZeRO-3 gathers parameters inside forward: a rank with fewer batches pads with discarded forwards."""
    val = load_split(demo_shards, "validation")
    ev = evaluator(val, lockstep=True)
    model = Constant(range(val.num_classes), val.num_classes)
    ev.evaluate(model, 0, 0)
    assert model.forwards == ev.stream.max_batches_per_rank()
