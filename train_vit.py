#!/usr/bin/env python
"""Train a Vision Transformer on ImageNet WebDataset shards with accelerate + DeepSpeed.

With no arguments this is FlagPerf's ViT-B/16 case (torchvision's recipe), e.g.
    accelerate launch --config_file accelerate_configs/1x8.yaml train_vit.py
and on a CPU, in minutes, on the embedded demo photos:
    python train_vit.py --demo
    accelerate launch --config_file accelerate_configs/cpu_1x2.yaml train_vit.py --demo

The story, top to bottom: config -> data -> model -> accelerate/DeepSpeed -> loop -> results.
"""

import argparse
import ast
import fcntl
import hashlib
import importlib.util
import math
import os
import re
import sys
import time
import warnings
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import psutil
import timm
import torch
from accelerate import Accelerator
from accelerate.utils import (DeepSpeedPlugin, InitProcessGroupKwargs, broadcast_object_list, gather_object,
                              set_seed)
from deepspeed.accelerator import get_accelerator
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler

from vitbench import checkpoint, dali_loader, data, dsconfig, lifecycle, precision, runinfo
from vitbench import metrics as M
from vitbench.metrics import DeviceMemoryMonitor
from vitbench.prep import write_json_atomic
from vitbench.profiler import StepProfiler, TraceWindow, peak_tflops, train_flops_per_sample
from vitbench.reporting import table_row
from vitbench.tracking import Tracker

REPO = Path(__file__).resolve().parent
# torch.distributed's deprecation notice for a call inside DeepSpeed, printed on every rank.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated")
DEFAULT_DATA_DIR = os.environ.get("VITBENCH_DATA_DIR", "/data/imagenet-wds")

# FlagPerf's recipe flags: any that a run changes is listed in its `fix_hp` column.
RECIPE_FLAGS = ["model", "img_size", "batch_size", "global_batch_size", "lr", "lr_base", "weight_decay", "epochs",
                "warmup_epochs", "smoothing", "mixup", "cutmix", "aa", "aug_repeats", "clip_grad"]

# --demo: a CPU-sized run of the same pipeline (flags given explicitly still win).
DEMO = dict(model="vit_tiny_patch16_224", img_size=64, patch_size=8, batch_size=32, global_batch_size=64,
            lr=1e-3, weight_decay=0.05, epochs=6, warmup_epochs=1, mixup=0.0, cutmix=0.0, smoothing=0.1,
            aug_repeats=1, eval_batch_size=100, workers=1, precision="fp32", log_interval=5,
            target_acc1=None, wandb="offline")


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as every other start-up error
        self.exit(2, f"error: {message} (see --help)\n")


def at_least(minimum, kind=int):
    """argparse type: a number >= MINIMUM, refused at parse time, before any work."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value
    return parse


def step_range(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+):(\d+)", text)
    if not m or int(m[1]) >= int(m[2]):
        raise argparse.ArgumentTypeError(f"wants A:B with 0 <= A < B, got '{text}'")
    return int(m[1]), int(m[2])


def key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"wants KEY=VALUE, got '{text}'")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a plain string, e.g. global_pool=avg


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pos, nonneg, pos_float, nonneg_float = at_least(1), at_least(0), at_least(1e-12, float), at_least(0.0, float)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="shards + _info.json (default: $VITBENCH_DATA_DIR or %(default)s)")
    g.add_argument("--workers", "-j", type=nonneg, default=None,
                   help="data loader processes per device (default: this machine's cores / devices, at most 16)")
    g.add_argument("--loader", choices=["wds", "dali"], default="wds",
                   help="train loader: wds (shard reader + PIL/timm transforms in worker processes) or dali "
                        "(NVIDIA DALI: nvjpeg decode and augmentation on the GPU; CPU operators on a CPU)")
    g.add_argument("--demo", action="store_true", help="build the demo shards if missing and run a CPU-sized demo")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_base_patch16_224", help="any timm model name")
    g.add_argument("--img-size", type=pos, default=None, help="input size (default: the model's, 224)")
    g.add_argument("--patch-size", type=pos, default=None, help="ViT patch size passed to timm")
    g.add_argument("--model-kwargs", nargs="*", type=key_value, default=[], metavar="KEY=VALUE",
                   help="extra timm create_model arguments, e.g. depth=6 embed_dim=384")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (DeepSpeed engine.compile)")
    g = p.add_argument_group("recipe (FlagPerf / torchvision ViT-B/16)")
    g.add_argument("--batch-size", "-b", type=pos, default=256, help="micro-batch per device")
    g.add_argument("--global-batch-size", type=pos, default=4096,
                   help="images per optimizer step; gradient accumulation = global / (batch-size x devices)")
    g.add_argument("--lr", type=pos_float, default=None, help="absolute lr (default: --lr-base scaled linearly)")
    g.add_argument("--lr-base", type=pos_float, default=3e-3, help="lr at --lr-base-size global batch")
    g.add_argument("--lr-base-size", type=pos, default=4096)
    g.add_argument("--weight-decay", type=nonneg_float, default=0.3)
    g.add_argument("--epochs", type=pos, default=300)
    g.add_argument("--warmup-epochs", type=nonneg_float, default=30)
    g.add_argument("--warmup-lr-factor", type=nonneg_float, default=0.033, help="warm-up starts at this fraction of lr")
    g.add_argument("--min-lr", type=nonneg_float, default=0.0)
    g.add_argument("--smoothing", type=nonneg_float, default=0.11, help="label smoothing")
    g.add_argument("--mixup", type=nonneg_float, default=0.2, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=nonneg_float, default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--aa", default="rand-m9-mstd0.5", help="timm auto-augment policy ('' for none)")
    g.add_argument("--aug-repeats", type=pos, default=3, help="repeated augmentation copies per decoded image")
    g.add_argument("--clip-grad", type=nonneg_float, default=1.0, help="gradient norm clipping (0: off)")
    g.add_argument("--target-acc1", type=float, default=79.98, help="stop once validation top-1 reaches this")
    g.add_argument("--seed", type=int, default=41)
    g = p.add_argument_group("system")
    g.add_argument("--precision", choices=precision.PRECISIONS, default="amp",
                   help="fp32 | tf32 | amp (fp16 autocast + loss scaling) | fp16 | bf16 (default: %(default)s)")
    g.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None,
                   help="override the ZeRO stage of the DeepSpeed config")
    g.add_argument("--deepspeed-config", default=None,
                   help="DeepSpeed JSON (default: the launch config's, else ds_configs/zero1.json)")
    g.add_argument("--eval-batch-size", type=pos, default=512)
    g.add_argument("--eval-every", type=pos, default=1, help="evaluate every N epochs (and at the end)")
    g.add_argument("--max-steps", type=pos, default=None, help="stop after N optimizer steps")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default=None, help="default: runs/<run-name>")
    g.add_argument("--run-name", default=None)
    g.add_argument("--checkpoint-every", type=nonneg, default=0,
                   help="optimizer steps between checkpoints (0: end only)")
    g.add_argument("--keep-checkpoints", type=pos, default=2)
    g.add_argument("--resume", default="", help="'auto' (newest complete checkpoint in the output dir) or a path")
    g.add_argument("--log-interval", type=pos, default=20, help="steps between profiler rows")
    g.add_argument("--timing-warmup-steps", type=nonneg, default=10,
                   help="steps left out of the *_steady throughput figures")
    g.add_argument("--profile-steps", type=step_range, default=None, metavar="A:B",
                   help="torch.profiler trace of steps A..B (0 <= A < B)")
    g.add_argument("--peak-tflops", type=pos_float, default=None, help="device peak for MFU (default: known table)")
    g.add_argument("--deepspeed-throughput-timer", action="store_true",
                   help="also run DeepSpeed's ThroughputTimer (a second opinion on p_core; it synchronizes the "
                        "device every step: for benchmarks only)")
    g.add_argument("--wandb", choices=["online", "offline", "off"], default="online",
                   help="online falls back to offline when there are no credentials")
    g.add_argument("--wandb-project", default="vitbench")
    g.add_argument("--wandb-entity", default=None)
    g.add_argument("--wandb-group", default=None, help="default: the run name")
    return p


def typed_flags(argv) -> set[str]:
    """The flags the user typed (a parse where nothing has a default)."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:  # the demo's values fill in only what the user did not type
        from vitbench.demo import DEFAULT_DIR

        typed = typed_flags(argv)
        for key, value in {**DEMO, "data_dir": str(DEFAULT_DIR)}.items():
            if key not in typed:
                setattr(args, key, value)
    args.fix_hp = {k: getattr(args, k) for k in RECIPE_FLAGS if getattr(args, k) != parser.get_default(k)}
    args.model_kwargs = dict(args.model_kwargs)
    return args


def fail(msg: str):
    """One line on stderr, exit status 2. os._exit: no teardown that could hang on a data loader worker or
    on ranks still waiting in a collective (the launcher ends those when this one exits)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)


def check_inputs(args, lay: dict):
    """Everything that can be wrong with the flags, the data and the checkpoint to resume, reported before
    any heavy work: a day-long run must never die late on something knowable at start."""
    world_size = lay["world_size"]
    if not timm.is_model(args.model):
        fail(f"unknown model '{args.model}' (see timm.list_models())")
    per_step = args.batch_size * world_size
    if args.global_batch_size % per_step:
        fail(f"--global-batch-size {args.global_batch_size} is not a multiple of --batch-size {args.batch_size} "
             f"x {world_size} devices")
    if (args.mixup or args.cutmix) and args.batch_size % 2:
        fail(f"mixup/cutmix need an even --batch-size, got {args.batch_size}")
    if args.loader == "dali":
        if importlib.util.find_spec("nvidia.dali") is None:
            fail("--loader dali needs NVIDIA DALI (pip install nvidia-dali-cuda130; `make setup` installs it)")
    if args.resume == "auto" and not (args.output_dir or args.run_name):
        fail("--resume auto needs the run's --output-dir (or --run-name): default run names carry a timestamp")
    try:
        if args.loader == "dali":
            dali_loader.rand_augment_args(args.aa or None)  # only RandAugment policies map onto DALI's
        train_shards = data.load_split(args.data_dir, "train")
        val_shards = data.load_split(args.data_dir, "validation")
        precision.check_supported(args.precision)
        ds_config = dsconfig.build(dsconfig.config_path(args.deepspeed_config), micro_batch=args.batch_size,
                                   grad_accum=args.global_batch_size // per_step, world_size=world_size,
                                   clip_grad=args.clip_grad, precision=args.precision, zero_stage=args.zero_stage,
                                   throughput_timer=args.deepspeed_throughput_timer)
        out_dir = output_dir(args)
        say = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
        resume_from = checkpoint.resolve_resume(args.resume, out_dir / "checkpoints" if out_dir else None,
                                                log=lambda m: say(m, file=sys.stderr))
        universal = resume_from is not None and checkpoint.check_layout(
            checkpoint.read_marker(resume_from), world_size=world_size,
            zero_stage=ds_config["zero_optimization"]["stage"], global_batch=args.global_batch_size,
            precision=args.precision)
    except (data.DataError, precision.PrecisionError, dsconfig.ConfigError, checkpoint.CheckpointError) as e:
        fail(str(e))
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    return train_shards, val_shards, ds_config, resume_from, universal


def output_dir(args, run_name: str | None = None) -> Path | None:
    name = args.run_name or run_name
    return Path(args.output_dir) if args.output_dir else REPO / "runs" / name if name else None


def build_demo_shards():
    """Every process may get here: the first builds, the others wait on the lock and find it done."""
    from vitbench.demo import DEFAULT_DIR, build

    DEFAULT_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(DEFAULT_DIR.parent / ".demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build(DEFAULT_DIR, progress=False)


class TrainState:
    """Counters saved in checkpoints alongside model, optimizer, loss scaler and LR schedule."""

    def __init__(self):
        self.step = self.epoch = self.step_in_epoch = 0

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, sd):
        vars(self).update(sd)


# ================================================================================================
# main: the whole story on one screen
# ================================================================================================
def main(argv=None):
    run = setup(parse_args(argv))  # config -> data -> model -> accelerate/DeepSpeed -> profiler/tracking
    args, state, prof = run.args, run.state, run.prof
    prof.train_start()
    with run.fatal_errors(), closing(run):  # closing: the train loader's workers stop before the process exits
        with TraceWindow(args.profile_steps, state.step, run.out_dir, run.rank, prof.pause) as trace:
            while not run.over():
                for micro_batches in run.epoch_batches():  # a step's batches: on the device, normalized, mixed
                    prof.compute_start()
                    logits, nonfinite = train_step(run.engine, micro_batches, run.loss_fn, run.loss_sum)
                    prof.step_end()
                    run.step_done(logits, nonfinite)  # counters, LR schedule, precision and non-finite checks
                    trace.step(state.step)
                    if state.step % args.log_interval == 0 or state.step == run.total_steps:
                        run.log_row()
                    if run.stop.agreed():  # SIGTERM/SIGUSR1 on any rank: checkpoint below, exit 75
                        run.interrupted = True
                        break
                    if run.checkpoint_due():
                        with prof.pause("checkpoint"):
                            run.save_checkpoint()
                if run.eval_due():
                    with prof.pause("eval"):
                        run.evaluate()
        prof.train_end()
        run.stop.finish()
        run.save_checkpoint()
    return finish(run)


# ------------------------------------------------------------------------------------------------
# One training step: the micro-batches of one optimizer step, forward + backward + step
# ------------------------------------------------------------------------------------------------
def train_step(engine, micro_batches, loss_fn, loss_sum):
    """Returns the last logits and a device flag: was any micro-batch's loss non-finite (no sync here).
    The DeepSpeed engine is driven directly: it accumulates gradients over micro-batches and steps (with
    clipping and loss scaling) at the accumulation boundary, so nothing else wraps the hot path."""
    nonfinite = torch.zeros((), dtype=torch.bool, device=loss_sum.device)
    for x, y in micro_batches:
        logits = engine(x)
        loss = loss_fn(logits.float(), y)
        engine.backward(loss)
        engine.step()
        loss = loss.detach()
        loss_sum += loss
        nonfinite |= ~torch.isfinite(loss)
    return logits, nonfinite


# ------------------------------------------------------------------------------------------------
# Set-up
# ------------------------------------------------------------------------------------------------
def setup(args) -> "Run":
    # ---- config: flags, data, DeepSpeed config and checkpoint, all checked before any heavy work ----
    runinfo.single_process_env()
    lifecycle.exit_with_launcher()
    lay = runinfo.layout()
    if args.workers is None:  # JPEG decoding needs many cores per GPU (FlagPerf uses 16)
        args.workers = max(1, min(16, (os.cpu_count() or 1) // lay["nproc_per_node"] - 1))
    if args.demo:
        build_demo_shards()
    train_shards, val_shards, ds_config, resume_from, universal = check_inputs(args, lay)

    # ---- accelerate + DeepSpeed process group, run name and output directory -------------------
    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config), kwargs_handlers=handlers,
                              gradient_accumulation_steps=ds_config["gradient_accumulation_steps"])
    device = accelerator.device
    precision.set_tf32(args.precision == "tf32")
    zero_stage = ds_config["zero_optimization"]["stage"]
    run_name = args.run_name or (f"{args.model}_{lay['nnodes']}x{lay['nproc_per_node']}_{args.precision}_"
                                 f"z{zero_stage}_{time.strftime('%Y%m%d-%H%M%S')}")
    run_name = broadcast_object_list([run_name])[0]  # one name for all ranks and nodes
    out_dir = output_dir(args, run_name)
    run_lock = None
    if accelerator.is_main_process:
        try:  # one run per output directory, held until this process ends
            run_lock = lifecycle.RunLock(out_dir)
        except lifecycle.LockError as e:
            fail(str(e))

    # ---- model, optimizer, LR schedule, engine ------------------------------------------------
    img_size = args.img_size or 224
    model_kwargs = dict(num_classes=train_shards.num_classes, img_size=img_size, **args.model_kwargs)
    if args.patch_size:
        model_kwargs["patch_size"] = args.patch_size
    make_model = partial(timm.create_model, args.model, **model_kwargs)
    set_seed(args.seed)  # identical initial weights on every rank
    try:
        model = make_model()
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        fail(f"--model {args.model} with {model_kwargs}: {type(e).__name__}: {e}")
    n_params = sum(p.numel() for p in model.parameters())
    lr = args.lr or args.lr_base * args.global_batch_size / args.lr_base_size
    # Fused AdamW (one kernel for all parameters, no per-tensor Python loop) where the device has it.
    fused = device.type in ("cuda", "cpu", "xpu")  # devices with torch's fused AdamW kernel
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay, fused=fused or None)
    steps_per_epoch = max(1, train_shards.num_samples // args.global_batch_size)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    # Stepped per optimizer update (FlagPerf steps per epoch): the same curve, without the staircase.
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, args.epochs * steps_per_epoch - warmup_steps),
                                  lr_min=args.min_lr, warmup_t=warmup_steps, warmup_lr_init=lr * args.warmup_lr_factor,
                                  warmup_prefix=True, t_in_epochs=False)
    engine, optimizer = accelerator.prepare(model, optimizer)
    if args.compile:
        engine.compile()
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    if resume_from:
        resume(accelerator, resume_from, universal, state)
    set_seed(args.seed + accelerator.process_index + 1000 * state.step)  # augmentation differs per rank, resume

    # ---- data: loss, mixup and the device-side batch preparation -------------------------------
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                  num_classes=train_shards.num_classes) if args.mixup or args.cutmix else None
    loss_fn = SoftTargetCrossEntropy() if mixup else \
        LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else torch.nn.CrossEntropyLoss()
    in_dtype = precision.input_dtype(args.precision)

    # ---- profiler and tracking ------------------------------------------------------------------
    env = runinfo.environment(device, REPO)
    peak, peak_source = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else \
        peak_tflops(env["device_name"] if device.type == "cuda" else None, args.precision)
    flops_per_sample = train_flops_per_sample(make_model, img_size)
    event_cls = get_accelerator().Event  # None on synchronous devices (CPU): host clock there
    prof = StepProfiler(global_batch=args.global_batch_size, world_size=accelerator.num_processes,
                        warmup_steps=args.timing_warmup_steps, synchronize=get_accelerator().synchronize,
                        make_event=partial(event_cls, enable_timing=True) if event_cls else None,
                        reduce_max=partial(reduce_max, device=device), flops_per_sample=flops_per_sample,
                        peak_tflops_per_device=peak, memory_probe=DeviceMemoryMonitor(device).probe)
    attn = getattr(getattr(engine.module, "blocks", [None])[0], "attn", None)
    grad_accum = ds_config["gradient_accumulation_steps"]
    config = {**vars(args), **lay, "fused_attn": getattr(attn, "fused_attn", None), "lr": lr,
              "zero_stage": zero_stage, "grad_accum_steps": grad_accum, "steps_per_epoch": steps_per_epoch,
              "total_steps": total_steps, "deepspeed_config": ds_config, "flops_per_sample": flops_per_sample,
              "peak_tflops_per_device": peak, "peak_tflops_source": peak_source,
              "optimizer": f"torch.optim.AdamW(fused={fused})"}
    tracker = Tracker(args.wandb, enabled=accelerator.is_main_process, run_dir=out_dir, project=args.wandb_project,
                      entity=args.wandb_entity, name=run_name, group=args.wandb_group or run_name,
                      config={**config, "env": env})
    accelerator.print(f"{run_name}: {args.model} {img_size}px, {accelerator.num_processes} device(s), "
                      f"{args.precision}, ZeRO-{zero_stage}, global batch {args.global_batch_size} = "
                      f"{args.batch_size} x {accelerator.num_processes} x {grad_accum} accum, {total_steps} steps "
                      f"({steps_per_epoch}/epoch), lr {lr:.3g}")
    try:  # --loader dali: the pipeline is built once per launch (it opens every train shard)
        dali = dali_loader.DaliTrainLoader(
            train_shards, img_size, args.aa or None, args.batch_size, rank=accelerator.process_index,
            world_size=accelerator.num_processes, threads=args.workers, seed=args.seed + 1000 * state.step,
            repeats=args.aug_repeats, device=device) if args.loader == "dali" else None
    except data.DataError as e:
        fail(str(e))
    return Run(
        args=args, lay=lay, accelerator=accelerator, engine=engine, optimizer=optimizer, scheduler=scheduler,
        state=state, prof=prof, tracker=tracker, stop=lifecycle.StopRequest(accelerator.num_processes),
        run_name=run_name, out_dir=out_dir, run_lock=run_lock, zero_stage=zero_stage, grad_accum=grad_accum,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, img_size=img_size, n_params=n_params,
        train_shards=train_shards, val_shards=val_shards, train_tf=data.train_transform(img_size, args.aa or None),
        val_stream=data.ValidationStream(val_shards, data.eval_transform(img_size), args.eval_batch_size,
                                         accelerator.process_index, accelerator.num_processes, args.workers),
        dali=dali,
        to_train_input=data.OnDevice(device, in_dtype, mixup), to_eval_input=data.OnDevice(device, in_dtype),
        loss_fn=loss_fn, env=env, config=config, resumed_from_step=state.step)


def resume(accelerator, resume_from: Path, universal: bool, state: TrainState) -> None:
    load_from = resume_from
    try:
        if universal:  # another number of processes wrote it: load DeepSpeed's universal conversion
            if accelerator.is_main_process:
                checkpoint.to_universal(resume_from, log=accelerator.print)
            accelerator.wait_for_everyone()
            load_from = resume_from / checkpoint.UNIVERSAL
        accelerator.load_state(str(load_from))
    except checkpoint.CheckpointError as e:
        fail(str(e))
    except Exception as e:
        fail(f"checkpoint {resume_from} does not load ({type(e).__name__}: {str(e)[:300]}); move it aside to "
             "resume from the one before it")
    accelerator.print(f"resumed from {resume_from} at step {state.step}"
                      + (" (universal checkpoint: the number of processes changed)" if universal else ""))


def reduce_max(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


NO_BAD_STEP = 2**62


# ------------------------------------------------------------------------------------------------
# The run: what the loop reads and the pieces it calls
# ------------------------------------------------------------------------------------------------
@dataclass
class Run:
    args: argparse.Namespace
    lay: dict
    accelerator: Accelerator
    engine: object  # deepspeed.DeepSpeedEngine
    optimizer: object
    scheduler: CosineLRScheduler
    state: TrainState
    prof: StepProfiler
    tracker: Tracker
    stop: lifecycle.StopRequest
    run_name: str
    out_dir: Path
    run_lock: object
    zero_stage: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    img_size: int
    n_params: int
    train_shards: data.ShardSet
    val_shards: data.ShardSet
    train_tf: object
    val_stream: data.ValidationStream
    dali: object  # dali_loader.DaliTrainLoader with --loader dali, else None
    to_train_input: data.OnDevice
    to_eval_input: data.OnDevice
    loss_fn: object
    env: dict
    config: dict
    resumed_from_step: int
    interrupted: bool = False
    reached_target: bool = False
    evals: list = field(default_factory=list)
    train_skipped: int = 0
    logits_dtype: torch.dtype | None = None
    loss_terms: int = 0
    train_batches: object = None  # the default loader's batch iterator, made at the first step of the launch

    def __post_init__(self):
        device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
        self.first_bad_step = torch.full((), NO_BAD_STEP, dtype=torch.long, device=device)
        self.skipped_steps = self.engine.skipped_steps
        self.has_scaler = self.args.precision in ("amp", "fp16")  # without one, a skipped step is no excuse

    def close(self) -> None:
        """Stop the train loader's workers. They ignore SIGTERM (lifecycle.ignore_stop_signals), so the
        terminate() that multiprocessing sends them at exit would leave the process waiting on them."""
        batches, self.train_batches = self.train_batches, None
        shutdown = getattr(batches, "_shutdown_workers", None)  # none without workers (--workers 0)
        if shutdown:
            shutdown()  # what the DataLoader iterator does itself when it runs out

    def over(self) -> bool:
        return self.state.step >= self.total_steps or self.reached_target or self.interrupted

    @contextmanager
    def fatal_errors(self):
        """Bad data and failed saves end the run with their one-line message (exit 2)."""
        try:
            yield
        except data.DataError as e:
            fail(data.error_message(e))
        except checkpoint.CheckpointError as e:
            fail(str(e))

    def epoch_batches(self):
        """The rest of this epoch, one optimizer step's micro-batches at a time, each ready on the device.
        The profiler's data wait runs from asking for a step's batches to their being ready (copy,
        normalization and mixup on the device included)."""
        state, args = self.state, self.args
        steps = min(self.steps_per_epoch - state.step_in_epoch, self.total_steps - state.step)
        if self.dali:
            batches = self.dali.batches(steps * self.grad_accum)
        else:
            if self.train_batches is None:  # one loader per launch: its workers serve every epoch that follows
                self.train_batches = iter(data.train_loader(
                    self.train_shards, self.train_tf, args.batch_size,
                    (self.steps_per_epoch - state.step_in_epoch) * self.grad_accum, rank=self.rank,
                    world_size=self.accelerator.num_processes, workers=args.workers, seed=args.seed,
                    epoch=state.epoch, resume_step=state.step_in_epoch, repeats=args.aug_repeats,
                    steps_per_epoch=self.steps_per_epoch * self.grad_accum,
                    pin_memory=self.accelerator.device.type == "cuda"))
            batches = self.train_batches
        for _ in range(steps):
            self.prof.data_start()
            micro = []
            for _ in range(self.grad_accum):
                b = next(batches)
                self.train_skipped += b["skipped"]
                micro.append(self.to_train_input(b["images"], b["labels"]))
            yield micro
        if state.step_in_epoch >= self.steps_per_epoch:
            state.epoch += 1
            state.step_in_epoch = 0

    def step_done(self, logits, nonfinite) -> None:
        state = self.state
        self.loss_terms += self.grad_accum
        if self.logits_dtype is None:  # first step of this launch: is the precision what its label says?
            self.logits_dtype = logits.dtype
            precision.verify(self.args.precision, precision.in_effect(self.engine, logits.dtype))
        if not (self.has_scaler and self.engine.skipped_steps != self.skipped_steps):  # not a scaler-skipped step
            self.first_bad_step = torch.where(nonfinite, torch.clamp(self.first_bad_step, max=state.step + 1),
                                              self.first_bad_step)
        self.skipped_steps = self.engine.skipped_steps
        state.step += 1
        state.step_in_epoch += 1
        self.scheduler.step_update(state.step)

    def check_finite(self) -> None:
        """All ranks agree (MIN over ranks) on the first step with a non-finite loss; stop before that step
        can reach a checkpoint or another log row."""
        bad = self.first_bad_step.clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
        if bad.item() != NO_BAD_STEP:
            fail(f"non-finite loss at step {bad.item()} (not a step the loss scaler skipped); no checkpoint was "
                 "written after it: lower --lr or check the data, then resume from the last checkpoint")

    def log_row(self) -> None:
        self.check_finite()
        state = self.state
        row = self.prof.interval_row()
        grad_norm = self.engine.get_global_grad_norm()
        row.update({
            M.LOSS: self.accelerator.reduce(self.loss_sum, reduction="mean").item() / self.loss_terms,
            M.LR: self.optimizer.param_groups[0]["lr"],
            M.GRAD_NORM: float(grad_norm) if grad_norm is not None else None,
            M.LOSS_SCALE: loss_scale(self.engine),
            M.EPOCH: state.epoch + state.step_in_epoch / self.steps_per_epoch,
        })
        self.loss_sum.zero_()
        self.loss_terms = 0
        self.tracker.log_step(state.step, row)
        self.accelerator.print(format_row(state.step, self.total_steps, row))

    def checkpoint_due(self) -> bool:
        every = self.args.checkpoint_every
        return bool(every) and self.state.step % every == 0 and self.state.step < self.total_steps

    def save_checkpoint(self) -> None:
        self.check_finite()
        meta = {"epoch": self.state.epoch, "world_size": self.accelerator.num_processes,
                "zero_stage": self.zero_stage, "global_batch_size": self.args.global_batch_size,
                "precision": self.args.precision}
        # The floor of the free-space check before the first save (no earlier checkpoint's size known yet):
        # fp32 weights + two Adam moments.
        checkpoint.save(self.accelerator, self.out_dir / "checkpoints", self.state.step,
                        keep=self.args.keep_checkpoints, meta=meta, min_bytes=12 * self.n_params)
        self.tracker.log_event("checkpoint", self.state.step)

    def eval_due(self) -> bool:
        state = self.state
        if self.interrupted:
            return False
        return (state.step_in_epoch == 0 and state.epoch % self.args.eval_every == 0) or state.step >= self.total_steps

    def evaluate(self) -> None:
        state, target = self.state, self.args.target_acc1
        final = evaluate(self.engine, self.val_stream, self.accelerator, self.to_eval_input, self.img_size,
                         lockstep=self.zero_stage == 3)
        self.evals.append({"epoch": state.epoch, "step": state.step, **final})
        self.tracker.log_eval(state.epoch, state.step, final)
        self.accelerator.print(f"eval epoch {state.epoch} step {state.step}: top-1 {final[M.ACC1]:.2f}  "
                               f"top-5 {final[M.ACC5]:.2f}  loss {final[M.VAL_LOSS]:.4f}  "
                               f"({final[M.EVAL_SAMPLES]} images)")
        if target is not None and final[M.ACC1] >= target:
            self.accelerator.print(f"reached target top-1 {target}")
            self.reached_target = True


# ------------------------------------------------------------------------------------------------
# Evaluation: every validation sample exactly once across ranks
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, stream, accelerator, to_input, img_size: int, lockstep: bool) -> dict:
    model.eval()
    device = accelerator.device
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top1, top5, count, skipped
    batches = 0
    for batch in data.validation_loader(stream, pin_memory=device.type == "cuda"):
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
    if lockstep:  # ZeRO-3 gathers parameters inside forward: every rank must run as many forwards
        pad = torch.zeros(1, 3, img_size, img_size, dtype=to_input.dtype, device=device)
        for _ in range(stream.max_batches_per_rank() - batches):
            model(pad)  # outputs discarded: padding is never counted
    sums = accelerator.reduce(sums, reduction="sum")
    loss, top1, top5, count, skipped = sums.tolist()
    model.train()
    return {M.ACC1: 100 * top1 / max(count, 1), M.ACC5: 100 * top5 / max(count, 1),
            M.VAL_LOSS: loss / max(count, 1), M.EVAL_SAMPLES: int(count), "skipped": int(skipped)}


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------
SUMMARY_KEYS = ("e2e_time", "p_whole", "p_train", "p_core", "final_acc1", "final_acc5", "val_loss", "mem_used_gib",
                "mem_total_gib", "p_whole_steady", "p_train_steady", "p_core_steady")


def finish(run: Run) -> dict:
    """results.json (the six figures and everything needed to trust and compare them), W&B summary."""
    accelerator, state, args = run.accelerator, run.state, run.args
    device = accelerator.device
    if run.interrupted:
        accelerator.print(f"interrupted by {run.stop.signal_name or 'a signal on another rank'}: checkpoint of step "
                          f"{state.step} saved; relaunch with --resume auto --output-dir {run.out_dir}")
    timing = run.prof.summary()
    final = run.evals[-1] if run.evals else None
    e2e = reduce_max([time.time() - psutil.Process().create_time()], device)[0]
    train_skipped = int(accelerator.reduce(torch.tensor(run.train_skipped, device=device), reduction="sum").item())
    results = {
        "run_name": run.run_name, **run.lay, "precision": args.precision, "zero_stage": run.zero_stage,
        "global_batch_size": args.global_batch_size, "global_step": state.step,
        "resumed_from_step": run.resumed_from_step, "epochs_done": state.epoch, "interrupted": run.interrupted,
        "loader": args.loader,
        "epoch_sampling": dali_loader.EPOCH_SAMPLING if run.dali else data.epoch_sampling(
            len(run.train_shards.urls), accelerator.num_processes, args.workers, args.aug_repeats),
        "eval_samples": final[M.EVAL_SAMPLES] if final else 0, "val_num_samples": run.val_shards.num_samples,
        "final_acc1": final[M.ACC1] if final else None, "final_acc5": final[M.ACC5] if final else None,
        "val_loss": final[M.VAL_LOSS] if final else None, "reached_target": run.reached_target,
        "skipped_corrupt": {"train": train_skipped, "validation": final["skipped"] if final else 0},
        "e2e_time": e2e, **timing,
        "mem": f"{timing['mem_used_gib']:.1f}/{timing['mem_total_gib']:.1f}" if "mem_used_gib" in timing else None,
        "fix_hp": args.fix_hp,
        "precision_in_effect": precision.in_effect(run.engine, run.logits_dtype),
        "replica_checksums": replica_checksums(run.engine, run.zero_stage),
        "evals": run.evals, "environment": run.env, "config": run.config,
    }
    if args.deepspeed_throughput_timer:  # an independent second opinion on p_core (it synchronizes each step)
        timer = run.engine.tput_timer
        results["deepspeed_throughput_timer"] = {"samples_per_sec": timer.avg_samples_per_sec(),
                                                 "start_step": timer.start_step}
    if accelerator.is_main_process:
        write_json_atomic(run.out_dir / "results.json", results)
        profile_dir = run.out_dir / "profile"
        run.tracker.finish({k: results[k] for k in SUMMARY_KEYS if k in results}, table_row(results),
                           [profile_dir] if profile_dir.is_dir() else [])
        print(f"results: {run.out_dir / 'results.json'}")
        print(f"e2e_time {e2e:.1f}s  p_whole {fmt(results['p_whole'])}  p_train {fmt(results['p_train'])}  "
              f"p_core {fmt(results['p_core'])} img/s  final_acc1 {fmt(results['final_acc1'])}  "
              f"mem {results['mem']} GiB")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if run.interrupted:
        sys.exit(lifecycle.EXIT_INTERRUPTED)
    return results


def replica_checksums(engine, zero_stage: int) -> list[str] | None:
    """A digest of every rank's full weights (ZeRO 0-2 keep a full replica per rank): all equal, or a bug."""
    if zero_stage == 3:
        return None
    h = hashlib.sha256()
    for p in engine.module.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return gather_object([h.hexdigest()[:16]])


def loss_scale(engine):
    opt = getattr(engine, "optimizer", None)
    for scaler in (getattr(engine, "torch_autocast_z0_gradscaler", None),
                   getattr(opt, "torch_autocast_gradscaler", None)):
        if scaler is not None:
            return float(scaler.get_scale())
    return float(opt.loss_scale) if engine.fp16_enabled() and hasattr(opt, "loss_scale") else None


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def format_row(step, total, row) -> str:
    parts = [f"step {step}/{total}", f"loss {row[M.LOSS]:.4f}", f"lr {row[M.LR]:.3g}",
             f"{row[M.THROUGHPUT]:.1f} img/s", f"step {row[M.STEP_TIME] * 1000:.0f} ms",
             f"data {row[M.DATA_WAIT_PCT]:.0f}%"]
    if M.MFU in row:
        parts.append(f"mfu {row[M.MFU]:.1f}%")
    mem = row.get(M.MEM_MAX_RESERVED, row.get(M.MEM_HOST_RSS))
    if mem is not None:
        parts.append(f"mem {mem:.2f} GiB")
    return "  ".join(parts)


if __name__ == "__main__":
    try:
        main()
    except Exception:  # print it, then exit at once: a normal teardown can hang on loader workers or peers
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
