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
        precision.SPECS[label].verify({**FP32_EFFECT, **change})


def test_verify_accepts_what_each_label_promises():
    precision.SPECS["fp32"].verify(FP32_EFFECT)
    precision.SPECS["tf32"].verify({**FP32_EFFECT, "tf32_matmul": True, "tf32_cudnn": True})
    precision.SPECS["amp"].verify({**FP32_EFFECT, "logits_dtype": "torch.float16",
                                   "loss_scaler": "torch.amp.GradScaler"})
    precision.SPECS["bf16"].verify({**FP32_EFFECT, "param_dtype": "torch.bfloat16", "logits_dtype": "torch.bfloat16"})


def build(tmp_path, cfg, **kw):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    args = dict(micro_batch=32, grad_accum=4, world_size=8, clip_grad=1.0, precision="amp", zero_stage=None)
    args.update(kw)
    return dsconfig.build(path, **{**args, "precision": precision.SPECS[args["precision"]]})


def test_flags_are_written_into_the_shipped_configs(tmp_path):
    for stage in range(4):
        cfg = dsconfig.build(dsconfig.DS_CONFIG_DIR / f"zero{stage}.json", micro_batch=32, grad_accum=4,
                             world_size=8, clip_grad=1.0, precision=precision.SPECS["amp"], zero_stage=None)
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
    assert cfg["bf16"] == {"enabled": True} and cfg["torch_autocast"] == {"enabled": False}


def test_a_users_fp16_loss_scaling_is_kept_and_ours_fills_in_the_rest(tmp_path):
    user = {"initial_scale_power": 8, "loss_scale_window": 200, "hysteresis": "auto"}
    cfg = build(tmp_path, {"zero_optimization": {"stage": 1}, "fp16": {"enabled": "auto", **user}},
                precision="fp16")
    assert cfg["fp16"] == {**precision.FP16_SCALING, "enabled": True, "initial_scale_power": 8,
                           "loss_scale_window": 200}
    # the same file under another precision: the section is off, whatever it held
    assert build(tmp_path, {"fp16": {"enabled": "auto", **user}}, precision="bf16")["fp16"] == {"enabled": False}


@pytest.mark.parametrize("cfg, message", [
    ({"train_micro_batch_size_per_gpu": 16}, "train_micro_batch_size_per_gpu=16 contradicts"),
    ({"gradient_clipping": 0.5}, "gradient_clipping=0.5 contradicts"),
    ({"fp16": {"enabled": True}}, "fp16.enabled=True contradicts --precision amp"),
    ({"torch_autocast": {"dtype": "torch.bfloat16"}}, "torch_autocast.dtype=torch.bfloat16 contradicts --precision"),
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


@pytest.mark.parametrize("name, machines, processes", [("1x1", 1, 1), ("1x8", 1, 8), ("2x8", 2, 16),
                                                        ("cpu_1x2", 1, 2)])
def test_committed_launch_configs_load_as_accelerate_reads_them(name, machines, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    from vitbench.dsconfig import DS_CONFIG_DIR

    cfg = load_config_from_file(str(DS_CONFIG_DIR.parent / "accelerate_configs" / f"{name}.yaml"))
    assert cfg.distributed_type == "DEEPSPEED" and not cfg.use_cpu
    assert (cfg.num_machines, cfg.num_processes) == (machines, processes)
    assert (DS_CONFIG_DIR.parent / cfg.deepspeed_config["deepspeed_config_file"]).is_file()
    assert cfg.enable_cpu_affinity == (not name.startswith("cpu"))  # GPU ranks pinned to their NUMA node
    if machines > 1:  # torchrun on every node: no ssh/pdsh
        assert cfg.deepspeed_config["deepspeed_multinode_launcher"] == "standard"


# ---- the DeepSpeed adapters, on real engines -------------------------------------------------------------
@pytest.fixture(scope="module")
def one_rank_group():
    """A one-process gloo group in this process, so that real DeepSpeed engines can be built in-process."""
    import os

    import torch.distributed as dist

    from vitbench.runinfo import free_port

    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def engine_for(label: str, stage: int):
    import deepspeed
    import torch

    spec = precision.SPECS[label]
    precision.set_tf32(spec.tf32)  # what the trainer does before building its engine
    cfg = dsconfig.build(dsconfig.DS_CONFIG_DIR / "zero1.json", micro_batch=2, grad_accum=1, world_size=1,
                         clip_grad=1.0, precision=spec, zero_stage=stage)
    model = torch.nn.Linear(4, 3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)
    return spec, engine


@pytest.mark.parametrize("label, stage", [("amp", 0), ("amp", 1), ("amp", 2), ("fp32", 1), ("bf16", 0), ("bf16", 1)])
def test_deepspeed_adapters_read_what_the_engine_runs(one_rank_group, label, stage):
    """Fails when a DeepSpeed upgrade moves the loss scaler, the skipped-step count or what in_effect reads."""
    import torch

    spec, engine = engine_for(label, stage)
    effect = precision.in_effect(engine)
    spec.verify(effect)  # the real engine is what the label promises
    other = "bf16" if label != "bf16" else "fp32"
    with pytest.raises(precision.PrecisionError):
        precision.SPECS[other].verify(effect)
    assert precision.loss_scale(engine) == (2.0**16 if spec.loss_scaler else None)
    assert precision.skipped_steps(engine) == 0
    loss = engine(torch.randn(2, 4, dtype=spec.input_dtype)).float().mean() * 1e-3  # no fp16 overflow at 2**16
    engine.backward(loss)
    engine.step()
    assert precision.skipped_steps(engine) == 0 and engine.global_steps == 1
    if stage > 0:  # DeepSpeed's ZeRO optimizer checks every step for overflow and counts what it skips
        engine.backward(engine(torch.randn(2, 4, dtype=spec.input_dtype)).float().sum() * float("inf"))
        engine.step()
        assert precision.skipped_steps(engine) == 1
        precision.back_off_after_skip(engine)  # ZeRO skipped before the autocast scaler saw the overflow
        assert precision.loss_scale(engine) == (2.0**15 if spec.loss_scaler else None)


@pytest.mark.parametrize("stage, optimizer", [(1, "BF16_Optimizer"), (2, "DeepSpeedZeroOptimizer"),
                                              (3, "DeepSpeedZeroOptimizer_Stage3")])
def test_bf16_with_accumulation_sums_gradients_in_fp32(one_rank_group, stage, optimizer):
    """The recipe's 1x1 row accumulates 16 micro-batches: DeepSpeed would sum them in bf16 unless told."""
    import deepspeed
    import torch

    spec = precision.SPECS["bf16"]
    cfg = dsconfig.build(dsconfig.DS_CONFIG_DIR / "zero1.json", micro_batch=2, grad_accum=2, world_size=1,
                         clip_grad=1.0, precision=spec, zero_stage=stage)
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    model = torch.nn.Linear(4, 3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)
    effect = precision.in_effect(engine)
    assert (effect["deepspeed_optimizer"], effect["grad_accum_dtype"]) == (optimizer, "torch.float32")
    for _ in range(2):  # one optimizer step of two micro-batches
        engine.backward(engine(torch.randn(2, 4, dtype=torch.bfloat16)).float().mean())
        engine.step()
    assert engine.global_steps == 1
    # without accumulation nothing is summed: the config says nothing, DeepSpeed keeps its default
    assert "data_types" not in dsconfig.build(dsconfig.DS_CONFIG_DIR / "zero1.json", micro_batch=2, grad_accum=1,
                                              world_size=1, clip_grad=1.0, precision=spec, zero_stage=stage)


def test_a_users_16_bit_gradient_accumulation_is_refused(tmp_path):
    with pytest.raises(dsconfig.ConfigError, match="data_types.grad_accum_dtype=bf16 would sum the bf16 gradients"):
        build(tmp_path, {"data_types": {"grad_accum_dtype": "bf16"}}, precision="bf16", grad_accum=4)
