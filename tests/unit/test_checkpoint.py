"""Checkpoints (vitbench/checkpoint.py), in-process: due when asked, complete or ignored, rotated, the newest
intact one chosen and loaded, every rank resuming from the same one, one line when one does not load or the disk
is full; --resume's choice, and the layout and data a resume needs. The accelerator is a small stand-in that
saves a real model with torch.save: checkpointing's own logic needs no engine (the real one:
tests/integration/test_faults_run.py)."""

import pytest
import torch

from vitbench import checkpoint
from vitbench.checkpoint import CheckpointError, CheckpointManager, CheckpointSpec


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


def test_resume_takes_the_newest_complete_checkpoint(tmp_path):
    for name, complete in [("step_00000004", True), ("step_00000008", True), ("step_00000012", False),
                           ("step_00000016.tmp", True)]:
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / checkpoint.MARKER).write_text("{}")
    assert checkpoint.resolve_resume("auto", tmp_path) == tmp_path / "step_00000008"
    assert checkpoint.resolve_resume("auto", tmp_path / "none") is None
    assert checkpoint.resolve_resume("", tmp_path) is None
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(str(tmp_path / "step_00000012"), tmp_path)


def test_resume_auto_with_every_checkpoint_damaged_is_a_clear_error(tmp_path):
    for step in (4, 8):
        d = tmp_path / f"step_{step:08d}"
        d.mkdir()
        (d / checkpoint.MARKER).write_text('{"files": {"model.pt": 10}}')
    (tmp_path / "step_00000004" / "model.pt").write_bytes(b"x" * 9)
    skipped = []
    with pytest.raises(checkpoint.CheckpointError, match="none of the 2 complete checkpoint"):
        checkpoint.resolve_resume("auto", tmp_path, log=skipped.append)
    assert len(skipped) == 2 and "model.pt is missing" in skipped[0] and "9 bytes, 10 were written" in skipped[1]


def test_a_layout_change_that_cannot_resume_is_refused_at_start(tmp_path):
    meta = {"world_size": 2, "zero_stage": 3, "global_batch_size": 16, "precision": "fp32"}
    with pytest.raises(checkpoint.CheckpointError, match="2 processes with ZeRO-3, this launch has 1 processes"):
        checkpoint.check_layout(meta, world_size=1, zero_stage=3, global_batch=16, precision="fp32")
    with pytest.raises(checkpoint.CheckpointError, match="--global-batch-size 16, this launch has 32"):
        checkpoint.check_layout({**meta, "zero_stage": 1}, world_size=1, zero_stage=1, global_batch=32,
                                precision="fp32")
    assert checkpoint.check_layout({**meta, "zero_stage": 1}, world_size=1, zero_stage=1, global_batch=16,
                                   precision="fp32") is True
    assert checkpoint.check_layout({**meta, "zero_stage": 0}, world_size=1, zero_stage=0, global_batch=16,
                                   precision="fp32") is False
    with pytest.raises(checkpoint.CheckpointError, match="ZeRO-1, this launch has ZeRO-2 .*--zero-stage 1"):
        checkpoint.check_layout({**meta, "zero_stage": 1}, world_size=2, zero_stage=2, global_batch=16,
                                precision="fp32")
    vit = {"model": "vit_tiny_patch16_224", "model_kwargs": {"num_classes": 10, "img_size": 32, "depth": 2}}
    made = {**meta, "zero_stage": 1, **vit}
    assert checkpoint.check_layout(made, world_size=2, zero_stage=1, global_batch=16, precision="fp32",
                                   model=vit) is False
    other = {**vit, "model_kwargs": {**vit["model_kwargs"], "img_size": 64}}
    with pytest.raises(checkpoint.CheckpointError, match="'img_size': 32.*this launch builds .*'img_size': 64"):
        checkpoint.check_layout(made, world_size=2, zero_stage=1, global_batch=16, precision="fp32", model=other)
    # bf16 at ZeRO-0 keeps the whole optimizer state on every rank, as fp32 does: no conversion needed
    assert checkpoint.check_layout({**meta, "zero_stage": 0, "precision": "bf16"}, world_size=1, zero_stage=0,
                                   global_batch=16, precision="bf16") is False


def test_a_checkpoint_resumes_only_on_the_data_it_was_trained_on():
    here = {"source": "/data/wds", "revision": None, "info_sha256": "a" * 64}
    checkpoint.check_data({"data": here}, {**here, "source": "s3://bucket/wds"})  # the same data, moved
    checkpoint.check_data({}, here)  # a checkpoint from before data identities were recorded
    other = {"source": "hf://datasets/o/r", "revision": "c" * 40, "info_sha256": "b" * 64}
    with pytest.raises(checkpoint.CheckpointError, match=r"trained on /data/wds \(_info.json sha256 aaaaaaaaaaaa\), "
                                                         r"this launch reads hf://datasets/o/r@c{40}"):
        checkpoint.check_data({"data": here}, other)

