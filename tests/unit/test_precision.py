"""What each --precision label means and runs (vitbench/precision.py), with the DeepSpeed config that carries it
(vitbench/dsconfig.py): labels verified against what is in effect, the config written from the flags and checked
by DeepSpeed's own model, and the adapters read back from real engines (one rank, in-process)."""

import json

import pytest

from vitbench import dsconfig, precision

FP32_EFFECT = {"param_dtype": "torch.float32", "logits_dtype": "torch.float32", "tf32_matmul": False,
               "tf32_cudnn": False, "loss_scaler": None}


@pytest.mark.parametrize("label, change, problem", [
    ("fp32", {"tf32_matmul": True}, "TF32 is on"),  # FlagPerf's mislabelled rows
    ("fp32", {"logits_dtype": "torch.float16"}, "computes in torch.float16"),
    ("tf32", {}, "TF32 is off"),
    ("amp", {"logits_dtype": "torch.float16"}, "no loss scaler"),
    ("bf16", {}, "the forward pass computes in torch.float32"),
    ("bf16", {"param_dtype": "torch.bfloat16", "logits_dtype": "torch.bfloat16"}, "parameters are torch.bfloat16"),
])
def test_verify_refuses_a_label_that_is_not_what_runs(label, change, problem):
    with pytest.raises(precision.PrecisionError, match=problem):
        precision.SPECS[label].verify({**FP32_EFFECT, **change})


def test_verify_accepts_what_each_label_promises():
    precision.SPECS["fp32"].verify(FP32_EFFECT)
    precision.SPECS["tf32"].verify({**FP32_EFFECT, "tf32_matmul": True, "tf32_cudnn": True})
    precision.SPECS["amp"].verify({**FP32_EFFECT, "logits_dtype": "torch.float16",
                                   "loss_scaler": "vitbench.optim.LossScaler (dynamic, global)"})
    precision.SPECS["bf16"].verify({**FP32_EFFECT, "logits_dtype": "torch.bfloat16"})  # autocast, fp32 weights


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
        assert cfg["train_batch_size"] == 32 * 4 * 8 and cfg["gradient_clipping"] == 0.0  # RecipeAdamW clips
        assert cfg["torch_autocast"] == {"enabled": True, "dtype": "torch.float16"}
        assert cfg["fp16"] == {"enabled": False} and cfg["bf16"] == {"enabled": False}
        assert cfg["timers"]["throughput"]["enabled"] is False


def test_zero_stage_flag_overrides_and_user_keys_survive(tmp_path):
    cfg = build(tmp_path, {"zero_optimization": {"stage": 1, "overlap_comm": True}, "fp16": {"enabled": True}},
                precision="fp16", zero_stage=3)
    assert cfg["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert cfg["fp16"]["enabled"] is True and cfg["torch_autocast"] == {"enabled": False}
    assert build(tmp_path, {}, precision="bf16")["torch_autocast"] == {"enabled": True, "dtype": "torch.bfloat16"}


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


@pytest.mark.parametrize("cfg, message", [
    ({"zero_optimization": {"stage": 1, "overlap_com": True}}, "zero_optimization.overlap_com: unknown key"),
    ({"zero_optimization": {"stage": 1}, "gradient_acumulation_steps": 2},
     "unknown DeepSpeed key 'gradient_acumulation_steps' (did you mean 'gradient_accumulation_steps'?)"),
    ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage: ZeRO has stages 0, 1, 2 and 3, not 5"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}}, "zero_optimization.reduce_bucket_size: Input "
                                                                         "should be a valid integer"),
    ({"zero_optimization": {"stage": 1}, "fp16": {"enabled": "auto", "loss_scael": 0}}, "fp16.loss_scael: unknown key"),
    ({"zero_optimization": {"stage": 1}, "made_up_section": {}}, "unknown DeepSpeed key 'made_up_section'"),
], ids=["section-typo", "top-level-typo", "stage-5", "wrong-type", "fp16-typo", "unknown-section"])
def test_deepspeeds_own_config_model_refuses_a_wrong_key_naming_file_and_key(tmp_path, cfg, message):
    with pytest.raises(dsconfig.ConfigError) as e:
        build(tmp_path, cfg, precision="fp16")
    assert str(e.value).startswith(f"{tmp_path / 'ds.json'}: ") and message in str(e.value), str(e.value)


def test_auto_values_accelerate_fills_in_later_pass_validation(tmp_path):
    cfg = build(tmp_path, {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}})
    assert cfg["zero_optimization"]["reduce_bucket_size"] == "auto"


def test_a_relative_config_path_is_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds_configs/zero2.json"}  # what accelerate_configs/*.yaml name
    assert dsconfig.config_path(None, env) == dsconfig.DS_CONFIG_DIR / "zero2.json"


# ---- the DeepSpeed adapters, on real engines -------------------------------------------------------------
def engine_for(label: str, stage: int, grad_accum: int = 1):
    """A real engine wired as the trainer wires it (optim.make_optimizer + optim.attach), on one rank."""
    import deepspeed
    import torch

    from vitbench import optim

    spec = precision.SPECS[label]
    precision.set_tf32(spec.tf32)  # what the trainer does before building its engine
    cfg = dsconfig.build(dsconfig.DS_CONFIG_DIR / "zero1.json", micro_batch=2, grad_accum=grad_accum, world_size=1,
                         clip_grad=1.0, precision=spec, zero_stage=stage)
    model = torch.nn.Linear(4, 3)
    opt = optim.make_optimizer(model.parameters(), precision=spec, lr=1e-3, weight_decay=0.0, clip_grad=1.0,
                              loss_scaling={"init_scale": 2.0**16} if spec.loss_scaler == "vitbench" else None,
                              device="cpu")
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    optim.attach(engine, opt, world_size=1, zero_stage=stage)
    return spec, engine, opt


@pytest.mark.parametrize("label, stage", [("amp", 0), ("amp", 1), ("amp", 2), ("amp", 3), ("fp32", 1),
                                          ("bf16", 0), ("bf16", 1)])
def test_deepspeed_adapters_read_what_the_engine_runs(one_rank_group, label, stage):
    """Fails when a DeepSpeed upgrade moves the loss scaler, the skipped-step count or what in_effect reads."""
    import deepspeed
    import torch

    from vitbench import optim

    spec, engine, opt = engine_for(label, stage)
    effect = precision.in_effect(engine)
    spec.verify(effect)  # the real engine is what the label promises
    assert effect["gradient_clipping"] == "vitbench.optim.RecipeAdamW" and engine.gradient_clipping() == 0
    other = "fp32" if label != "fp32" else "amp"
    with pytest.raises(precision.PrecisionError):
        precision.SPECS[other].verify({**effect, "logits_dtype": str(spec.compute_dtype)})
    assert precision.loss_scale(engine) == (2.0**16 if spec.loss_scaler else None)
    outcome = optim.StepOutcome(engine, opt)
    engine.backward(engine(torch.randn(2, 4)).float().mean())
    engine.step()
    assert outcome.skipped() is not True and not bool(outcome.skipped()) and engine.global_steps == 1
    # a non-finite gradient: never applied; under amp the scale backs off (DeepSpeed's decision at ZeRO-3,
    # RecipeAdamW's elsewhere), without one it is what the guard calls a bad step
    def weights():
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
            return [p.detach().clone() for p in engine.module.parameters()]
    before = weights()
    engine.backward(engine(torch.randn(2, 4)).float().sum() * float("inf"))
    engine.step()
    assert bool(outcome.skipped())
    assert all(torch.equal(a, b) for a, b in zip(before, weights()))
    assert precision.loss_scale(engine) == (2.0**15 if spec.loss_scaler else None)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_with_accumulation_sums_gradients_in_fp32(one_rank_group, stage):
    """The recipe's 1x1 row accumulates 16 micro-batches: bf16 is autocast over fp32 weights, so every
    gradient, and what the micro-batches sum into, is fp32 (DeepSpeed's bf16 weights summed in bf16)."""
    import torch

    spec, engine, _ = engine_for("bf16", stage, grad_accum=2)
    effect = precision.in_effect(engine)
    assert (effect["param_dtype"], effect["autocast_dtype"], effect["grad_accum_dtype"]) == \
        ("torch.float32", "torch.bfloat16", "torch.float32")
    for _ in range(2):  # one optimizer step of two micro-batches
        logits = engine(torch.randn(2, 4))
        assert logits.dtype == torch.bfloat16
        engine.backward(logits.float().mean())
        engine.step()
    assert engine.global_steps == 1


def test_fp16_weights_with_accumulation_sum_gradients_in_fp32(tmp_path):
    cfg = build(tmp_path, {}, precision="fp16", grad_accum=4)
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg["gradient_clipping"] == 1.0  # DeepSpeed's fp16 optimizers clip against their own loss scale
    with pytest.raises(dsconfig.ConfigError, match="data_types.grad_accum_dtype=fp16 would sum the fp16 gradients"):
        build(tmp_path, {"data_types": {"grad_accum_dtype": "fp16"}}, precision="fp16", grad_accum=4)


@pytest.mark.parametrize("label", ["fp32", "amp", "bf16"])
def test_our_optimizer_clips_and_deepspeed_reads_no_norm(tmp_path, label):
    """RecipeAdamW clips; DeepSpeed's clipping and its ZeRO 1-2 norm (host syncs) are off; no overlap (and its
    per-backward device sync) at one process."""
    for stage in (1, 2):
        one = build(tmp_path, {"zero_optimization": {"stage": stage, "overlap_comm": True}}, precision=label,
                    world_size=1, grad_accum=1)
        assert one["gradient_clipping"] == 0.0 and one["zero_optimization"]["compute_grad_norm"] is False
        assert one["zero_optimization"]["overlap_comm"] is False
        many = build(tmp_path, {"zero_optimization": {"stage": stage, "overlap_comm": True}}, precision=label)
        assert many["zero_optimization"]["overlap_comm"] is True  # 8 ranks: there is communication to overlap


def test_amp_applies_a_users_fp16_scaling_keys_or_refuses_them_naming_the_key(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"fp16": {"enabled": "auto", "initial_scale_power": 12, "loss_scale_window": 500,
                                         "loss_scale": 0}}))
    assert dsconfig.amp_loss_scaling(path) == {"init_scale": 2.0**12, "growth_interval": 500}
    path.write_text(json.dumps({"fp16": {"enabled": "auto"}}))
    assert dsconfig.amp_loss_scaling(path) == {"init_scale": 2.0**16, "growth_interval": 2000}  # GradScaler's
    for section, message in [({"hysteresis": 2}, "fp16.hysteresis has no counterpart under --precision amp"),
                             ({"min_loss_scale": 1}, "fp16.min_loss_scale has no counterpart"),
                             ({"loss_scale": 128}, "fp16.loss_scale has no counterpart"),
                             ({"initial_scale_power": "16"}, "fp16.initial_scale_power='16' must be an integer"),
                             ({"loss_scale_window": 0}, "fp16.loss_scale_window=0 must be an integer from 1")]:
        path.write_text(json.dumps({"fp16": section}))
        with pytest.raises(dsconfig.ConfigError, match=message) as e:
            dsconfig.amp_loss_scaling(path)
        assert str(path) in str(e.value)
