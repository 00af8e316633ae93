"""The Plan: a table of flag sets, launch environments and machines -> the decisions or the error, in-process.

No process is launched and no engine built: every decision a launch makes before its first step is checked
here in milliseconds, on machines described by their facts (a CPU, an H200, a V100), whatever machine runs
the tests.
"""

import json

import pytest

from vitbench import checkpoint, cli, plan
from vitbench.errors import UserError
from vitbench.runinfo import MachineFacts

from conftest import REPO

CPU = MachineFacts("cpu", "a CPU without fp16", None, fp16=False, bf16=True, autocast=True, cpus=2)
H200 = MachineFacts("cuda", "NVIDIA H200", (9, 0), fp16=True, bf16=True, autocast=True, cpus=64, host_ip="10.1.2.3")
V100 = MachineFacts("cuda", "Tesla V100-SXM2-32GB", (7, 0), fp16=True, bf16=False, autocast=True, cpus=40,
                    host_ip="10.1.2.4")
ONE = {"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
ONE_NODE_8 = {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}
TWO_NODES_8 = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}
TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8", "--model-kwargs", "depth=2"]


def make(demo_shards, flags, environ=ONE, machine=H200, **kw):
    args = cli.parse_args(["--data-dir", str(demo_shards), *TINY, *flags])
    return plan.make_plan(args, environ, machine, REPO, **kw)


# (flags, environment, machine) -> the Plan's fields: FlagPerf's recipe on each layout, one recipe for every row
DECIDED = [
    ([], ONE, H200, dict(grad_accum=16, lr=3e-3, zero_stage=0, world_size=1, nnodes=1)),  # ZeRO at 1: overhead
    ([], ONE_NODE_8, H200, dict(zero_stage=1)),
    ([], ONE_NODE_8, H200, dict(grad_accum=2, nnodes=1, nproc_per_node=8)),
    ([], TWO_NODES_8, H200, dict(grad_accum=1, nnodes=2, nproc_per_node=8, world_size=16)),
    (["--global-batch-size", "2048"], ONE_NODE_8, H200, dict(grad_accum=1, lr=3e-3 * 2048 / 4096)),
    (["--lr", "0.5", "--zero-stage", "3"], ONE_NODE_8, H200, dict(lr=0.5, zero_stage=3)),
    (["--max-steps", "3", "--epochs", "300"], ONE, H200, dict(total_steps=3)),
    (["--global-batch-size", "16", "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "0.5"], ONE, CPU,
     dict(steps_per_epoch=120 // 16, total_steps=2 * (120 // 16), warmup_steps=round(0.5 * (120 // 16)))),
]


@pytest.mark.parametrize("flags, environ, machine, expected", DECIDED)
def test_the_plan_decides_layout_batch_and_schedule_once(demo_shards, flags, environ, machine, expected):
    p = make(demo_shards, flags, environ, machine)
    decided = {k: getattr(p.recipe, k) if k in ("lr", "warmup_steps") else getattr(p, k) for k in expected}
    assert decided == pytest.approx(expected)
    assert p.ds_config["gradient_accumulation_steps"] == p.grad_accum
    assert p.ds_config["train_batch_size"] == p.grad_accum * p.loader.batch_size * p.world_size
    assert p.model_kwargs == {"num_classes": 10, "img_size": 32, "depth": 2, "patch_size": 8}


@pytest.mark.parametrize("label, machine, spec", [
    ("fp32", CPU, dict(param_dtype="torch.float32", tf32=False, loss_scaler=None, autocast=False)),
    ("tf32", H200, dict(param_dtype="torch.float32", tf32=True, peak_class="tf32")),
    ("amp", CPU, dict(param_dtype="torch.float32", compute_dtype="torch.float16", autocast=True,
                      loss_scaler="vitbench")),
    ("fp16", V100, dict(param_dtype="torch.float16", loss_scaler="deepspeed")),
    ("bf16", H200, dict(param_dtype="torch.float32", compute_dtype="torch.bfloat16", autocast=True,
                        loss_scaler=None)),
])
def test_what_a_precision_label_means_is_one_spec_and_the_deepspeed_config_follows_it(demo_shards, label,
                                                                                       machine, spec):
    p = make(demo_shards, ["--precision", label], machine=machine)
    assert {k: p.precision.to_json()[k] for k in spec} == spec
    ds = p.ds_config
    assert ds["fp16"]["enabled"] == (label == "fp16") and ds["bf16"]["enabled"] is False
    assert ds["torch_autocast"]["enabled"] == (label in ("amp", "bf16"))
    assert ds["gradient_clipping"] == (1.0 if label == "fp16" else 0.0)  # else RecipeAdamW clips
    assert p.precision.input_dtype == p.precision.param_dtype


@pytest.mark.parametrize("flags, environ, machine, message", [
    (["--precision", "tf32"], ONE, CPU, "--precision tf32 needs an NVIDIA GPU with TF32"),
    (["--precision", "tf32"], ONE, V100, "Ampere or newer"),
    (["--precision", "bf16"], ONE, V100, "--precision bf16 is not supported on DeepSpeed's 'cuda'"),
    (["--precision", "fp16"], ONE, CPU, "--precision fp16 needs fp16 weights"),
    (["--global-batch-size", "20", "--batch-size", "8"], ONE, CPU, "not a multiple of --batch-size 8 x 1"),
    (["--global-batch-size", "4096"], TWO_NODES_8, H200, None),  # 256 x 16 divides 4096: no error
    (["--global-batch-size", "2048"], TWO_NODES_8, H200, "not a multiple of --batch-size 256 x 16 devices"),
    (["--batch-size", "7", "--global-batch-size", "7"], ONE, CPU, "mixup/cutmix need an even --batch-size"),
    (["--model", "vit_nonexistent"], ONE, CPU, "unknown model 'vit_nonexistent'"),
    (["--model-kwargs", "img_size=64"], ONE, CPU, "img_size=... is set by --img-size"),
    (["--model-kwargs", "num_classes=5"], ONE, CPU, "num_classes=... is set by the data's _info.json"),
    (["--model-kwargs", "depth=two"], ONE, CPU, "--model vit_tiny_patch16_224 with"),
    (["--resume", "auto"], ONE, CPU, "--resume auto needs the run's --output-dir"),
    (["--loader", "dali", "--aa", "augmix-m5"], ONE, CPU, "supports RandAugment policies"),
    (["--deepspeed-config", "/nonexistent/ds.json"], ONE, CPU, "/nonexistent/ds.json: DeepSpeed config not found"),
    (["--model", "resnet50"], ONE, CPU, "--model resnet50 is a ResNet: the trainer supports timm's Vision Transformers"),
    (["--model", "convnext_tiny"], ONE, CPU, "is a ConvNeXt: the trainer supports timm's Vision Transformers"),
    (["--aa", "autoaug"], ONE, CPU, "--aa autoaug: expected 'ra'"),
    (["--precision", "fp32"], {**ONE, "ACCELERATE_MIXED_PRECISION": "bf16"}, H200,
     "accelerate launch --mixed_precision bf16 (--precision bf16) contradicts --precision fp32"),
    ([], {**ONE, "ACCELERATE_MIXED_PRECISION": "fp8"}, H200, "--mixed_precision fp8: not a precision of this trainer"),
    (["--zero-stage", "3"], {**ONE_NODE_8, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, H200,
     "accelerate launch --zero_stage 2 contradicts --zero-stage 3"),
    ([], {**ONE_NODE_8, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, H200,
     "--gradient_accumulation_steps 4 contradicts the recipe's 2 (--global-batch-size 4096 / (--batch-size 256 x 8"),
    ([], {**ONE_NODE_8, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"}, H200, None),  # what the recipe derives
    ([], {**ONE, "ACCELERATE_GRADIENT_CLIPPING": "0.5"}, H200, "--gradient_clipping 0.5 contradicts --clip-grad 1.0"),
])
def test_what_cannot_run_is_refused_by_the_plan_naming_the_flag(demo_shards, flags, environ, machine, message):
    if message is None:
        make(demo_shards, flags, environ, machine)
        return
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        make(demo_shards, flags, environ, machine)


def test_a_missing_data_dir_and_a_contradicting_config_name_the_file(demo_shards, tmp_path):
    args = cli.parse_args(["--data-dir", str(tmp_path / "none"), *TINY])
    with pytest.raises(UserError, match=f"{tmp_path}/none/_info.json: not found"):
        plan.make_plan(args, ONE, CPU, REPO)
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 4}))
    with pytest.raises(UserError, match=f"{cfg}: gradient_accumulation_steps=4 contradicts the flags"):
        make(demo_shards, ["--deepspeed-config", str(cfg)], machine=CPU)


def test_the_launch_config_and_the_flag_choose_the_deepspeed_config(demo_shards):
    zero3 = {**ONE_NODE_8, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "ds_configs" / "zero3.json")}
    assert make(demo_shards, [], zero3).zero_stage == 3
    assert make(demo_shards, ["--deepspeed-config", str(REPO / "ds_configs" / "zero2.json")], zero3).zero_stage == 2
    assert make(demo_shards, ["--zero-stage", "0"], zero3).zero_stage == 0


def test_loader_workers_come_from_the_usable_cpus_and_oversubscription_is_warned(demo_shards):
    assert make(demo_shards, [], ONE_NODE_8, H200).loader.workers == 64 // 8 - 1
    assert make(demo_shards, [], ONE, CPU).loader.workers == 1
    assert make(demo_shards, [], ONE, H200).loader.workers == plan.MAX_DEFAULT_WORKERS
    assert not make(demo_shards, [], ONE_NODE_8, H200).warnings
    crowded = make(demo_shards, ["--workers", "16"], ONE_NODE_8, H200)
    assert crowded.loader.workers == 16 and "8 ranks x 16 loader workers on 64 usable CPUs" in crowded.warnings[0]


def test_resume_target_and_layout_are_decided_from_the_checkpoint_directory(demo_shards, tmp_path):
    out = tmp_path / "run"
    assert make(demo_shards, ["--output-dir", str(out), "--resume", "auto"]).resume_from is None  # nothing yet
    ckpt = out / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    marker = {"step": 4, "world_size": 8, "zero_stage": 1, "global_batch_size": 4096, "precision": "amp"}
    (ckpt / checkpoint.MARKER).write_text(json.dumps({**marker, "files": {}}))
    p = make(demo_shards, ["--output-dir", str(out), "--resume", "auto"], ONE_NODE_8)
    assert (p.resume_from, p.universal) == (ckpt, False)
    fewer = make(demo_shards, ["--output-dir", str(out), "--resume", "auto"], {"WORLD_SIZE": "4",
                                                                               "LOCAL_WORLD_SIZE": "4"})
    assert fewer.universal and fewer.ds_config["checkpoint"] == {"load_universal": True}
    with pytest.raises(UserError, match="--precision amp, this launch has --precision bf16"):
        make(demo_shards, ["--output-dir", str(out), "--resume", "auto", "--precision", "bf16"], ONE_NODE_8)


def test_the_plan_is_recorded_as_json_and_frozen(demo_shards):
    p = make(demo_shards, ["--run-name", "r1"])
    record = json.loads(json.dumps(p.to_json()))
    assert record["precision"]["label"] == "amp" and record["loader"]["kind"] == "wds"
    assert record["data"]["train_samples"] == 120 and record["grad_accum_steps"] == p.grad_accum
    assert p.run_dir("ignored", REPO) == REPO / "runs" / "r1"
    with pytest.raises(AttributeError):
        p.lr = 1.0


# ---- flags: checked at parse time, before the Plan ---------------------------------------------------
@pytest.mark.parametrize("flag, value", [
    ("--batch-size", "0"), ("--global-batch-size", "0"), ("--epochs", "0"), ("--max-steps", "0"),
    ("--eval-every", "0"), ("--log-interval", "0"), ("--checkpoint-every", "-1"), ("--keep-checkpoints", "0"),
    ("--eval-batch-size", "0"), ("--workers", "-1"), ("--lr", "0"), ("--profile-steps", "5:5"),
    ("--profile-steps", "3:1"), ("--profile-steps", "x"), ("--model-kwargs", "depth"),
    ("--lr", "nan"), ("--warmup-epochs", "nan"), ("--warmup-epochs", "inf"), ("--weight-decay", "nan"),
    ("--smoothing", "1.5"), ("--smoothing", "nan"), ("--clip-grad", "nan"), ("--min-lr", "inf"),
    ("--target-acc1", "nan"), ("--mixup", "-1"),
])
def test_bad_flag_is_one_line_at_parse_time(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        cli.parse_args([flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and err[0].startswith("error:")


def test_demo_fills_in_only_what_was_not_typed():
    args = cli.parse_args(["--demo", "--precision", "amp", "--wandb", "online"])
    assert (args.precision, args.wandb) == ("amp", "online")
    assert (args.model, args.img_size) == (cli.DEMO["model"], cli.DEMO["img_size"])
    assert args.fix_hp["model"] == cli.DEMO["model"] and "lr" in args.fix_hp  # changed from the recipe
    assert "precision" not in args.fix_hp  # not a recipe flag


@pytest.mark.parametrize("environ, machine, label", [(ONE, H200, "amp"), (ONE_NODE_8, H200, "amp"),
                                                     (TWO_NODES_8, H200, "bf16"), (TWO_NODES_8, V100, "amp")])
def test_without_precision_one_node_runs_amp_and_several_nodes_run_bf16_where_the_device_has_it(
        demo_shards, environ, machine, label):
    args = cli.parse_args(["--data-dir", str(demo_shards), *TINY])
    assert args.precision is None
    p = plan.make_plan(args, environ, machine, REPO)
    assert p.precision.label == label
    assert make(demo_shards, ["--precision", "fp32"], environ, machine).precision.label == "fp32"  # typed wins


def test_a_multi_node_launch_whose_hostname_is_loopback_is_refused_naming_the_variable(demo_shards):
    from dataclasses import replace

    loopback = replace(H200, host_ip="127.0.1.1")  # Debian's /etc/hosts default for the machine's own name
    with pytest.raises(UserError, match="resolves to the loopback address 127.0.1.1.*set GLOO_SOCKET_IFNAME"):
        make(demo_shards, [], TWO_NODES_8, loopback)
    assert make(demo_shards, [], {**TWO_NODES_8, "GLOO_SOCKET_IFNAME": "ib0"}, loopback).nnodes == 2
    assert make(demo_shards, [], ONE_NODE_8, loopback).nnodes == 1  # one node: loopback is where its ranks are


def test_dali_on_many_ranks_without_index_files_is_warned(demo_shards):
    pytest.importorskip("nvidia.dali")
    warned = make(demo_shards, ["--loader", "dali"], ONE_NODE_8, H200).warnings
    assert any("--dali-index" in w for w in warned)
    assert not any("--dali-index" in w for w in make(demo_shards, ["--loader", "dali"], ONE, H200).warnings)



def test_the_plan_says_how_much_of_the_split_a_pass_reads(demo_shards):
    p = make(demo_shards, ["--batch-size", "8", "--global-batch-size", "16", "--workers", "1"], ONE, CPU)
    # every shard is dealt out; what a pass leaves unread is what its whole steps do not ask for
    assert p.pass_coverage == pytest.approx(p.steps_per_epoch * 16 / 120)
    # too few shards for 8 ranks x 16 workers: epochs resample shards (results.json's epoch_sampling says so)
    assert make(demo_shards, ["--workers", "16"], ONE_NODE_8, H200).pass_coverage is None


def test_a_directory_that_holds_a_run_is_refused_without_resume_and_a_finished_run_is_left_alone(demo_shards,
                                                                                                 tmp_path):
    out = tmp_path / "run"
    flags = ["--output-dir", str(out), "--max-steps", "5"]
    assert make(demo_shards, flags).finished is None  # a new directory: nothing held
    (out / "checkpoints" / "step_00000003").mkdir(parents=True)
    (out / "checkpoints" / "step_00000003" / checkpoint.MARKER).write_text("{}")
    with pytest.raises(UserError, match=f"{out} holds a run already \\(checkpoint step 3\\): --resume auto"):
        make(demo_shards, flags)
    assert make(demo_shards, [*flags, "--resume", "auto"]).finished is None  # interrupted at 3 of 5: resume
    (out / "results.json").write_text(json.dumps({"global_step": 5, "interrupted": False, "final_acc1": 51.0}))
    with pytest.raises(UserError, match="results.json of a finished run, step 5; checkpoint step 3"):
        make(demo_shards, flags)
    done = make(demo_shards, [*flags, "--resume", "auto"]).finished
    assert "finished at step 5 (trained all 5 steps); nothing to resume, nothing changed" in done
    assert make(demo_shards, [*flags[:-1], "9", "--resume", "auto"]).finished is None  # a longer run goes on


def test_fp16_weights_accumulation_at_zero0_is_refused_and_one_process_keeps_zero_for_it(demo_shards):
    with pytest.raises(UserError, match="--precision fp16 with 2 micro-batches per step at ZeRO-0 .* fp32 only"):
        make(demo_shards, ["--precision", "fp16", "--zero-stage", "0"], ONE_NODE_8, H200)
    one = make(demo_shards, ["--precision", "fp16"], ONE, H200)  # 16 micro-batches: ZeRO-1 sums them in fp32
    assert one.zero_stage == 1 and one.ds_config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert make(demo_shards, ["--precision", "bf16", "--zero-stage", "0"], ONE, H200).grad_accum == 16  # fp32 grads


def test_zero_at_one_process_runs_zero_0_and_says_so_unless_it_offloads(demo_shards, tmp_path):
    p = make(demo_shards, ["--zero-stage", "2"], ONE, H200)
    assert p.zero_stage == 0 and p.ds_config["zero_optimization"]["stage"] == 0
    assert any("ZeRO-2 partitions across processes; with one it only adds copies" in w for w in p.warnings)
    assert make(demo_shards, ["--zero-stage", "2"], ONE_NODE_8, H200).zero_stage == 2
    offload = tmp_path / "offload.json"
    offload.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    assert make(demo_shards, ["--deepspeed-config", str(offload)], ONE, H200).zero_stage == 2  # saves memory


def test_amp_loss_scaling_comes_from_the_configs_fp16_keys(demo_shards, tmp_path):
    assert make(demo_shards, ["--precision", "amp"]).loss_scaling == {"init_scale": 2.0**16, "growth_interval": 2000}
    assert make(demo_shards, ["--precision", "bf16"]).loss_scaling is None
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"fp16": {"initial_scale_power": 10, "hysteresis": 4}}))
    with pytest.raises(UserError, match=f"{cfg}: fp16.hysteresis has no counterpart under --precision amp"):
        make(demo_shards, ["--precision", "amp", "--deepspeed-config", str(cfg)])


def test_a_bad_wandb_init_timeout_is_refused_at_start(demo_shards):
    """It would make W&B fail at start, and the run keep no W&B files at all."""
    for value in ("abc", "inf", "-1"):
        with pytest.raises(UserError, match=f"WANDB_INIT_TIMEOUT='{value}' is not a number of seconds"):
            make(demo_shards, ["--wandb", "offline"], {**ONE, "WANDB_INIT_TIMEOUT": value})
    make(demo_shards, ["--wandb", "off"], {**ONE, "WANDB_INIT_TIMEOUT": "abc"})  # W&B off: not read


@pytest.mark.parametrize("environ, expected", [
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, dict(precision="bf16")),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, dict(precision="amp")),  # fp16 autocast + loss scaling
    ({"ACCELERATE_MIXED_PRECISION": "no"}, dict(precision="amp")),  # accelerate's default: nothing asked
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, dict(zero_stage=2)),
])
def test_what_accelerate_launch_was_asked_is_what_runs(demo_shards, environ, expected):
    p = make(demo_shards, [], {**ONE_NODE_8, **environ}, H200)
    assert {k: p.precision.label if k == "precision" else getattr(p, k) for k in expected} == expected


def test_the_image_size_is_the_models_own_unless_the_flag_says_otherwise(demo_shards):
    def planned(*flags):
        args = cli.parse_args(["--data-dir", str(demo_shards), "--model-kwargs", "depth=1", *flags])
        return plan.make_plan(args, ONE, H200, REPO)
    assert planned("--model", "vit_small_patch16_384").img_size == 384
    assert planned("--model", "vit_small_patch16_224").img_size == 224
    p = planned("--model", "vit_small_patch16_384", "--img-size", "96")
    assert p.img_size == p.loader.img_size == p.model_kwargs["img_size"] == 96


def test_the_recipe_records_the_train_transform_that_runs(demo_shards):
    p = make(demo_shards, [], ONE, CPU)
    assert p.recipe.auto_augment == "ra"
    assert "RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31, interpolation=InterpolationMode.BILINEAR" \
        in p.recipe.train_transform
    assert "RandomResizedCrop(size=(32, 32)" in p.recipe.train_transform and "ColorJitter" not in p.recipe.train_transform
    assert p.to_json()["recipe"]["train_transform"] == p.recipe.train_transform


def test_an_unwritable_output_dir_is_refused_by_the_plan(demo_shards, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(UserError, match=f"{a_file}/run: cannot create the output directory or write in it"):
        make(demo_shards, ["--output-dir", str(a_file / "run")], ONE, CPU)


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

