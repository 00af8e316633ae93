"""The trainer's components, in-process, each on its own: the checkpoint manager (when a save is due, complete
and rotated saves, the launch's choice of checkpoint agreed across ranks, loading), the evaluator (when it is
due, every validation sample counted once, the target), results.json's builder. The divergence guard's
branches are in test_step.py. No process is launched: an accelerator is a small stand-in that saves a real
model with torch.save, since checkpointing's own logic needs no engine."""

from collections import Counter

import pytest
import torch

from vitbench import checkpoint, cli, plan, reporting, results
from vitbench import metrics as M
from vitbench.checkpoint import CheckpointError, CheckpointManager, CheckpointSpec
from vitbench.data import shardread
from vitbench.data.shardformat import load_split, parse_label
from vitbench.data.transforms import OnDevice, eval_transform
from vitbench.data.validation import ValidationStream
from vitbench.evaluator import EvalSpec, Evaluator
from vitbench.runinfo import MachineFacts

CPU = MachineFacts("cpu", "a CPU", None, fp16=False, bf16=True, autocast=True, cpus=2)


class OneRankAccelerator:
    """What CheckpointManager asks of accelerate's Accelerator, on one rank: state saved and loaded for real."""

    device, process_index, is_main_process = torch.device("cpu"), 0, True

    def __init__(self, model):
        self.model = model

    def save_state(self, where):
        torch.save(self.model.state_dict(), f"{where}/model.pt")

    def load_state(self, where):
        self.model.load_state_dict(torch.load(f"{where}/model.pt"))

    def reduce(self, t, reduction):
        return t

    def wait_for_everyone(self):
        pass

    def print(self, *args):
        print(*args)


def manager(root, model, every=2, keep=2, total=10, broadcast=lambda objs: objs):
    return CheckpointManager(CheckpointSpec(every, keep), root, OneRankAccelerator(model), total_steps=total,
                             meta={"world_size": 1}, min_bytes=0, broadcast=broadcast)


def test_a_checkpoint_is_due_every_n_steps_but_not_at_the_end_which_always_saves(tmp_path):
    m = manager(tmp_path, torch.nn.Linear(2, 2), every=3, total=9)
    assert [s for s in range(1, 10) if m.due(s)] == [3, 6]
    assert not any(manager(tmp_path, torch.nn.Linear(2, 2), every=0).due(s) for s in range(1, 10))


def test_saves_are_complete_rotated_and_the_newest_intact_one_is_chosen_and_loads(tmp_path):
    model = torch.nn.Linear(3, 2)
    m = manager(tmp_path, model, keep=2)
    saved = {}
    for step in (2, 4, 6):
        with torch.no_grad():
            model.weight.fill_(step)
        saved[step] = m.save(step, epoch=step // 4)
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [4, 6]  # keep=2: step 2 removed
    assert checkpoint.read_marker(saved[6])["epoch"] == 1
    (saved[6] / "model.pt").write_bytes(b"damaged")  # the newest is damaged: the one before is chosen
    chosen = checkpoint.resolve_resume("auto", tmp_path, log=lambda _: None)
    assert chosen == saved[4]
    m.agree_on_resume(chosen)
    m.load(chosen, universal=False)
    assert torch.equal(model.weight, torch.full((2, 3), 4.0))


def test_a_rank_that_would_resume_from_another_checkpoint_stops_the_launch(tmp_path):
    rank0_saw = [str(tmp_path / "step_00000004")]
    m = manager(tmp_path, torch.nn.Linear(2, 2), broadcast=lambda objs: rank0_saw)
    with pytest.raises(CheckpointError, match="rank 0 would resume from .*rank 0 from .*step_00000004: every node "
                                              "must see the same --output-dir"):
        m.agree_on_resume(tmp_path / "step_00000006")


def test_a_checkpoint_that_does_not_load_is_one_line_naming_it(tmp_path):
    m = manager(tmp_path, torch.nn.Linear(3, 2))
    path = m.save(2, epoch=0)
    other = manager(tmp_path / "b", torch.nn.Linear(5, 2))  # another model: shapes differ
    with pytest.raises(CheckpointError, match=f"checkpoint {path} does not load into this launch"):
        other.load(path, universal=False)


def test_a_full_disk_never_leaves_a_half_written_checkpoint(tmp_path, small_fs, capsys):
    """A real full filesystem (tmpfs): with room for one checkpoint but not two, the second save is refused
    before it writes, the first kept intact, and the first save warned of it; with less room than one, the
    write fails midway and nothing of it stays."""
    model = torch.nn.Linear(256, 256)  # a 257 KiB checkpoint
    size = 4 * 257 * 256 + 4096
    root = small_fs(int(size * 1.6)) / "checkpoints"
    m = manager(root, model, keep=2)
    m.save(2, epoch=0)
    assert "the next save will not fit" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=f"not enough space under {root} for checkpoint step 4: .*; the "
                                              "previous checkpoint step 2 is intact"):
        m.save(4, epoch=0)
    assert [s for s, _ in checkpoint.complete_checkpoints(root)] == [2]
    assert checkpoint.damage(root / "step_00000002") is None and not list(root.glob("*.tmp"))

    tight = small_fs(size // 2) / "checkpoints"  # above the floor the first save checks (0 here), below its size
    with pytest.raises(CheckpointError, match=f"no space left on device writing checkpoint step 1 under {tight}; "
                                              "no checkpoint was written yet"):
        manager(tight, model).save(1, epoch=0)
    assert list(tight.iterdir()) == []


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


def test_results_record_the_plans_decisions_and_the_wandb_table_is_the_reports(demo_shards):
    flags = cli.parse_args(["--data-dir", str(demo_shards), "--model", "vit_tiny_patch16_224", "--img-size", "32",
                            "--patch-size", "8", "--model-kwargs", "depth=2", "--checkpoint-every", "7",
                            "--eval-every", "3", "--mixup", "0", "--cutmix", "0", "--peak-tflops", "12.5"])
    p = plan.make_plan(flags, {"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}, CPU, cli.REPO)
    timing = {"p_whole": 10.0, "p_train": 11.0, "p_core": 12.0, "mem_used_gib": 1.0, "mem_total_gib": 2.0}
    evals = [{"epoch": 1, "step": 5, M.ACC1: 40.0, M.ACC5: 90.0, M.VAL_LOSS: 1.5, M.EVAL_SAMPLES: 50, "skipped": 0}]
    out = results.build(plan=p, run_name="r", global_step=5, resumed_from_step=0, epochs_done=1, interrupted=False,
                        evals=evals, reached_target=False, train_skipped=0, e2e_time=20.0, timing=timing,
                        precision_in_effect={}, replica_checksums=None, environment={}, config={})
    decided = out["plan"]
    assert decided["recipe"]["loss"] == "label-smoothing-cross-entropy" and decided["recipe"]["smoothing"] == 0.11
    assert decided["checkpoints"] == {"every_steps": 7, "keep": 2}
    assert decided["evaluation"] == {"every_epochs": 3, "batch_size": 512, "target_acc1": 79.98}
    assert decided["measurement"]["peak_tflops"] == 12.5 and decided["measurement"]["log_interval"] == 20
    assert decided["tracking"]["mode"] == "online" and decided["recipe"]["seed"] == 41
    assert (out["final_acc1"], out["eval_samples"], out["mem"]) == (40.0, 50, "1.0/2.0")
    columns, row = results.table(out)
    # W&B's table: the report's columns with their units, the figures as numbers (sortable), memory as two
    assert columns == reporting.WANDB_COLUMNS and row == reporting.numeric_row(out)
    assert columns[:8] == reporting.COLUMNS["en"][:8] and row[:3] == reporting.table_row(out, "en")[:3]
    assert dict(zip(columns, row))["mem used (GiB)"] == 1.0
    assert reporting.describe(out)["batch_size"] == 256  # the report reads the Plan's decisions
