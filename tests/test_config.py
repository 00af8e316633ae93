"""Precision verification, DeepSpeed config building and checkpoint selection (no training)."""

import json

import pytest

from vitbench import checkpoint, dsconfig, precision

FP32_EFFECT = {"param_dtype": "torch.float32", "logits_dtype": "torch.float32", "tf32_matmul": False,
               "tf32_cudnn": False, "loss_scaler": None}


@pytest.mark.parametrize("label, change, problem", [
    ("fp32", {"tf32_matmul": True}, "TF32 is on"),  # FlagPerf's mislabelled rows
    ("fp32", {"logits_dtype": "torch.float16"}, "computes in torch.float16"),
    ("tf32", {}, "TF32 is off"),
    ("amp", {"logits_dtype": "torch.float16"}, "no loss scaler"),
    ("bf16", {}, "parameters are torch.float32"),
])
def test_verify_refuses_a_label_that_is_not_what_runs(label, change, problem):
    with pytest.raises(precision.PrecisionError, match=problem):
        precision.verify(label, {**FP32_EFFECT, **change})


def test_verify_accepts_what_each_label_promises():
    precision.verify("fp32", FP32_EFFECT)
    precision.verify("tf32", {**FP32_EFFECT, "tf32_matmul": True, "tf32_cudnn": True})
    precision.verify("amp", {**FP32_EFFECT, "logits_dtype": "torch.float16", "loss_scaler": "torch.amp.GradScaler"})
    precision.verify("bf16", {**FP32_EFFECT, "param_dtype": "torch.bfloat16", "logits_dtype": "torch.bfloat16"})


def build(tmp_path, cfg, **kw):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    args = dict(micro_batch=32, grad_accum=4, world_size=8, clip_grad=1.0, precision="amp", zero_stage=None)
    return dsconfig.build(path, **{**args, **kw})


def test_flags_are_written_into_the_shipped_configs(tmp_path):
    for stage in range(4):
        cfg = dsconfig.build(dsconfig.DS_CONFIG_DIR / f"zero{stage}.json", micro_batch=32, grad_accum=4,
                             world_size=8, clip_grad=1.0, precision="amp", zero_stage=None)
        assert cfg["zero_optimization"]["stage"] == stage
        assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (32, 4)
        assert cfg["train_batch_size"] == 32 * 4 * 8 and cfg["gradient_clipping"] == 1.0
        assert cfg["torch_autocast"] == {"enabled": True, "dtype": "torch.float16"}
        assert cfg["fp16"] == {"enabled": False} and cfg["bf16"] == {"enabled": False}
        assert cfg["timers"]["throughput"]["enabled"] is False


def test_zero_stage_flag_overrides_and_user_keys_survive(tmp_path):
    cfg = build(tmp_path, {"zero_optimization": {"stage": 1, "overlap_comm": True}, "bf16": {"enabled": True}},
                precision="bf16", zero_stage=3)
    assert cfg["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert cfg["bf16"]["enabled"] is True and cfg["torch_autocast"] == {"enabled": False}


@pytest.mark.parametrize("cfg, message", [
    ({"train_micro_batch_size_per_gpu": 16}, "train_micro_batch_size_per_gpu=16 contradicts"),
    ({"gradient_clipping": 0.5}, "gradient_clipping=0.5 contradicts"),
    ({"fp16": {"enabled": True}}, "fp16.enabled=True contradicts --precision amp"),
    ({"optimizer": {"type": "AdamW"}}, "owns both"),
])
def test_contradicting_config_is_refused_naming_file_and_key(tmp_path, cfg, message):
    with pytest.raises(dsconfig.ConfigError, match=message) as e:
        build(tmp_path, {"zero_optimization": {"stage": 1}, **cfg})
    assert str(tmp_path / "ds.json") in str(e.value)


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


@pytest.mark.parametrize("name, machines, processes", [("1x1", 1, 1), ("1x8", 1, 8), ("2x8", 2, 16),
                                                        ("cpu_1x2", 1, 2)])
def test_committed_launch_configs_load_as_accelerate_reads_them(name, machines, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    from vitbench.dsconfig import DS_CONFIG_DIR

    cfg = load_config_from_file(str(DS_CONFIG_DIR.parent / "accelerate_configs" / f"{name}.yaml"))
    assert cfg.distributed_type == "DEEPSPEED" and not cfg.use_cpu
    assert (cfg.num_machines, cfg.num_processes) == (machines, processes)
    assert (DS_CONFIG_DIR.parent / cfg.deepspeed_config["deepspeed_config_file"]).is_file()
    if machines > 1:  # torchrun on every node: no ssh/pdsh
        assert cfg.deepspeed_config["deepspeed_multinode_launcher"] == "standard"
