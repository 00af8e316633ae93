#!/usr/bin/env python
"""Train a Vision Transformer on ImageNet WebDataset shards with accelerate + DeepSpeed.

With no arguments this is FlagPerf's ViT-B/16 case (torchvision's recipe), e.g.
    accelerate launch --config_file accelerate_configs/1x8.yaml train_vit.py
and on a CPU, in minutes, on the embedded demo photos:
    python train_vit.py --demo
    accelerate launch --config_file accelerate_configs/cpu_1x2.yaml train_vit.py --demo

The story, top to bottom: flags -> Plan (every decision, checked before any work) -> data, model,
accelerate/DeepSpeed -> loop -> results.
"""

import argparse
import ast
import fcntl
import hashlib
import math
import os
import re
import sys
import time
import warnings
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import timm
import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, broadcast_object_list, gather_object, set_seed
from deepspeed.accelerator import get_accelerator
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler

from vitbench import checkpoint, data, lifecycle, loaders, precision
from vitbench import metrics as M
from vitbench.errors import EXIT_USER_ERROR, UserError
from vitbench.guard import DivergenceGuard
from vitbench.loaders import LOADERS, TrainLoader
from vitbench.metrics import DeviceMemoryMonitor
from vitbench.plan import Plan, make_plan
from vitbench.prep import write_json_atomic
from vitbench.profiler import StepProfiler, TraceWindow, peak_tflops, train_flops_per_sample
from vitbench.reporting import num, table_row
from vitbench.runinfo import MachineFacts, environment, single_process_env
from vitbench.step import StepOutcome, attach, make_optimizer
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


# ================================================================================================
# main: the whole story on one screen
# ================================================================================================
def main(argv=None) -> dict:
    args = parse_args(argv)
    single_process_env()  # plain `python train_vit.py` is a one-process launch of the same path
    lifecycle.exit_with_launcher()
    if args.demo:
        build_demo_shards()
    plan = plan_this_launch(args)  # every decision and check, before any heavy work
    if plan.finished:  # --resume of a finished run: say so (once per node), change nothing
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(plan.finished)
        return {}
    run = setup(args, plan)  # data -> model -> accelerate/DeepSpeed engine -> profiler/tracking
    state, prof = run.state, run.prof
    prof.train_start()
    with closing(run):  # on any exit: loader workers stopped, W&B closed
        with TraceWindow(args.profile_steps, state.step, run.out_dir, run.rank, prof.pause) as trace:
            while not run.over():
                for micro_batches in run.epoch_batches():  # a step's batches: on the device, normalized, mixed
                    prof.compute_start()
                    logits, nonfinite = train_step(run.engine, micro_batches, run.loss_fn, run.loss_sum)
                    prof.step_end()
                    run.step_done(logits, nonfinite)  # counters, LR schedule, precision and non-finite checks
                    trace.step(state.step)
                    if state.step % args.log_interval == 0 or state.step == plan.total_steps:
                        run.log_row()
                    if run.stop.agreed():  # SIGTERM/SIGUSR1/SIGINT on any rank: checkpoint below, exit 75
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
    The DeepSpeed engine is driven directly: it accumulates gradients over micro-batches and, at the
    accumulation boundary, calls step.RecipeAdamW, which unscales, clips and skips on the device; nothing
    else wraps the hot path and nothing in it reads a value back (tests/test_step.py counts)."""
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
# The command line: flags and the edge that turns errors into one line
# ------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as every other start-up error
        self.exit(EXIT_USER_ERROR, f"error: {message} (see --help)\n")


def at_least(minimum, kind=int, below=None):
    """argparse type: a finite number >= MINIMUM (and < BELOW), refused at parse time, before any work."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got '{text}'") from None
        if not math.isfinite(value) or value < minimum or (below is not None and value >= below):
            limits = f">= {minimum}" + (f" and < {below}" if below is not None else "")
            raise argparse.ArgumentTypeError(f"must be a finite number {limits}, got {text}")
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


POS, NONNEG, POS_FLOAT, NONNEG_FLOAT = at_least(1), at_least(0), at_least(1e-12, float), at_least(0.0, float)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="shards + _info.json (default: $VITBENCH_DATA_DIR or %(default)s)")
    g.add_argument("--workers", "-j", type=NONNEG, default=None,
                   help="data loader processes per device (default: usable CPUs / devices - 1, at most 16)")
    g.add_argument("--loader", choices=LOADERS, default="wds",
                   help="train loader: wds (shard reader + PIL/timm transforms in worker processes) or dali "
                        "(NVIDIA DALI: nvjpeg decode and augmentation on the GPU; CPU operators on a CPU)")
    g.add_argument("--demo", action="store_true", help="build the demo shards if missing and run a CPU-sized demo")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_base_patch16_224", help="any timm model name")
    g.add_argument("--img-size", type=POS, default=None, help="input size (default: the model's, 224)")
    g.add_argument("--patch-size", type=POS, default=None, help="ViT patch size passed to timm")
    g.add_argument("--model-kwargs", nargs="*", type=key_value, default=[], metavar="KEY=VALUE",
                   help="extra timm create_model arguments, e.g. depth=6 embed_dim=384")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (DeepSpeed engine.compile)")
    _add_recipe_flags(p.add_argument_group("recipe (FlagPerf / torchvision ViT-B/16)"))
    _add_system_flags(p.add_argument_group("system"))
    _add_output_flags(p.add_argument_group("output"))
    return p


def _add_recipe_flags(g) -> None:
    g.add_argument("--batch-size", "-b", type=POS, default=256, help="micro-batch per device")
    g.add_argument("--global-batch-size", type=POS, default=4096,
                   help="images per optimizer step; gradient accumulation = global / (batch-size x devices)")
    g.add_argument("--lr", type=POS_FLOAT, default=None, help="absolute lr (default: --lr-base scaled linearly)")
    g.add_argument("--lr-base", type=POS_FLOAT, default=3e-3, help="lr at --lr-base-size global batch")
    g.add_argument("--lr-base-size", type=POS, default=4096)
    g.add_argument("--weight-decay", type=NONNEG_FLOAT, default=0.3)
    g.add_argument("--epochs", type=POS, default=300)
    g.add_argument("--warmup-epochs", type=NONNEG_FLOAT, default=30)
    g.add_argument("--warmup-lr-factor", type=NONNEG_FLOAT, default=0.033,
                   help="warm-up starts at this fraction of lr")
    g.add_argument("--min-lr", type=NONNEG_FLOAT, default=0.0)
    g.add_argument("--smoothing", type=at_least(0.0, float, below=1.0), default=0.11, help="label smoothing")
    g.add_argument("--mixup", type=NONNEG_FLOAT, default=0.2, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=NONNEG_FLOAT, default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--aa", default="rand-m9-mstd0.5", help="timm auto-augment policy ('' for none)")
    g.add_argument("--aug-repeats", type=POS, default=3, help="repeated augmentation copies per decoded image")
    g.add_argument("--clip-grad", type=NONNEG_FLOAT, default=1.0, help="gradient norm clipping (0: off)")
    g.add_argument("--target-acc1", type=at_least(0.0, float), default=79.98,
                   help="stop once validation top-1 reaches this")
    g.add_argument("--seed", type=int, default=41)


def _add_system_flags(g) -> None:
    g.add_argument("--precision", choices=precision.PRECISIONS, default=None,
                   help="fp32 | tf32 | amp (fp16 autocast + loss scaling) | fp16 | bf16 (default: amp on one node; "
                        "bf16 across nodes where the device has it: no loss scaling)")
    g.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None,
                   help="override the ZeRO stage of the DeepSpeed config")
    g.add_argument("--deepspeed-config", default=None,
                   help="DeepSpeed JSON (default: the launch config's, else ds_configs/zero1.json)")
    g.add_argument("--eval-batch-size", type=POS, default=512)
    g.add_argument("--eval-every", type=POS, default=1, help="evaluate every N epochs (and at the end)")
    g.add_argument("--max-steps", type=POS, default=None, help="stop after N optimizer steps")
    g.add_argument("--nccl-busbw", type=POS_FLOAT, default=None, metavar="GB/S",
                   help="all_reduce bus bandwidth measured with nccl-tests across this run's nodes, recorded in "
                        "results.json beside the scaling figures (README: before the first 2x8 run)")
    g.add_argument("--deepspeed-throughput-timer", action="store_true",
                   help="also run DeepSpeed's ThroughputTimer (a second opinion on p_core; it synchronizes the "
                        "device every step: for benchmarks only)")


def _add_output_flags(g) -> None:
    g.add_argument("--output-dir", default=None, help="default: runs/<run-name>")
    g.add_argument("--run-name", default=None)
    g.add_argument("--checkpoint-every", type=NONNEG, default=0,
                   help="optimizer steps between checkpoints (0: end only)")
    g.add_argument("--keep-checkpoints", type=POS, default=2)
    g.add_argument("--resume", default="", help="'auto' (newest complete checkpoint in the output dir) or a path")
    g.add_argument("--log-interval", type=POS, default=20, help="steps between profiler rows")
    g.add_argument("--timing-warmup-steps", type=NONNEG, default=10,
                   help="steps left out of the *_steady throughput figures")
    g.add_argument("--profile-steps", type=step_range, default=None, metavar="A:B",
                   help="torch.profiler trace of steps A..B (0 <= A < B)")
    g.add_argument("--peak-tflops", type=POS_FLOAT, default=None, help="device peak for MFU (default: known table)")
    g.add_argument("--wandb", choices=["online", "offline", "off"], default="online",
                   help="online falls back to offline when there are no credentials")
    g.add_argument("--wandb-project", default="vitbench")
    g.add_argument("--wandb-entity", default=None)
    g.add_argument("--wandb-group", default=None, help="default: the run name")


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:  # the demo's values become the defaults: what the user typed still wins
        from vitbench.demo import DEFAULT_DIR

        parser.set_defaults(**DEMO, data_dir=str(DEFAULT_DIR))
        args = parser.parse_args(argv)
    recipe = build_parser()
    args.fix_hp = {k: getattr(args, k) for k in RECIPE_FLAGS if getattr(args, k) != recipe.get_default(k)}
    args.model_kwargs = dict(args.model_kwargs)
    return args


def build_demo_shards():
    """Every process may get here: the first builds, the others wait on the lock and find it done."""
    from vitbench.demo import DEFAULT_DIR, build

    DEFAULT_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(DEFAULT_DIR.parent / ".demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build(DEFAULT_DIR, progress=False)


def plan_this_launch(args) -> Plan:
    """The Plan for this machine and launcher. Its errors are the same on every rank of a node (they read the
    same flags, data and checkpoints), so cli() prints them once per node."""
    try:
        return make_plan(args, os.environ, MachineFacts.probe(), REPO)
    except UserError as e:
        e.same_on_every_local_rank = True
        raise


def cli(argv=None) -> None:
    """The process edge. A UserError (bad flag, data, config or checkpoint; a diverged loss) is one line and
    exit status 2. Errors leave through os._exit once main's own clean-up has run: interpreter teardown could
    hang on ranks still waiting in a collective (the launcher ends those when this one exits)."""
    try:
        main(argv)
        return
    except UserError as e:
        if not getattr(e, "same_on_every_local_rank", False) or os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {data.error_message(e)}", file=sys.stderr)  # a Plan error: once per node
        code = EXIT_USER_ERROR
    except SystemExit as e:  # 75: interrupted with a checkpoint
        code = e.code if isinstance(e.code, int) else 1
    except KeyboardInterrupt:  # Ctrl-C before the stop handler exists (start-up): nothing was trained yet
        print("interrupted during start-up; nothing was trained", file=sys.stderr)
        code = 130
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class TrainState:
    """Counters saved in checkpoints alongside model, optimizer, loss scaler and LR schedule."""

    def __init__(self):
        self.step = self.epoch = self.step_in_epoch = 0

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, sd):
        vars(self).update(sd)


# ------------------------------------------------------------------------------------------------
# Set-up: the Plan's objects
# ------------------------------------------------------------------------------------------------
def setup(args, plan: Plan) -> "Run":
    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=plan.ds_config), kwargs_handlers=handlers,
                              gradient_accumulation_steps=plan.grad_accum)
    device, rank = accelerator.device, accelerator.process_index
    for note in plan.warnings if accelerator.is_main_process else ():
        print(f"warning: {note}", file=sys.stderr)
    agree_on_resume(plan, rank)
    precision.set_tf32(plan.precision.tf32)
    run_name = broadcast_object_list([plan.run_name or plan.default_run_name(time.strftime("%Y%m%d-%H%M%S"))])[0]
    out_dir = plan.run_dir(run_name, REPO)
    run_lock = lifecycle.RunLock(out_dir) if accelerator.is_main_process else None  # one run per output dir

    engine, optimizer, scheduler, state = build_engine(args, plan, accelerator)
    set_seed(args.seed + rank + 1000 * state.step)  # augmentation differs per rank, and after a resume
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                  num_classes=plan.train.num_classes) if args.mixup or args.cutmix else None
    loss_fn = SoftTargetCrossEntropy() if mixup else \
        LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else torch.nn.CrossEntropyLoss()

    env = environment(device, REPO)
    prof, extras = build_profiler(args, plan, accelerator, env)
    attn = getattr(getattr(engine.module, "blocks", [None])[0], "attn", None)
    config = {**vars(args), **extras, "fused_attn": getattr(attn, "fused_attn", None),
              "optimizer": "vitbench.step.RecipeAdamW (torch fused AdamW; unscale, clip and skip on the device)"}
    tracker = Tracker(args.wandb, enabled=accelerator.is_main_process, run_dir=out_dir, project=args.wandb_project,
                      entity=args.wandb_entity, name=run_name, group=args.wandb_group or run_name,
                      config={**config, "env": env, "plan": plan.to_json()})
    accelerator.print(f"{run_name}: {plan.model} {plan.img_size}px, {plan.world_size} device(s), "
                      f"{plan.precision.label}, ZeRO-{plan.zero_stage}, global batch {args.global_batch_size} = "
                      f"{args.batch_size} x {plan.world_size} x {plan.grad_accum} accum, {plan.total_steps} steps "
                      f"({plan.steps_per_epoch}/epoch), lr {plan.lr:.3g}, loader {plan.loader.kind}")
    loader = loaders.build(plan.loader, plan.train, rank=rank, world_size=plan.world_size, seed=args.seed,
                           epoch=state.epoch, step_in_epoch=state.step_in_epoch, step=state.step,
                           steps_per_epoch=plan.steps_per_epoch, grad_accum=plan.grad_accum, device=device)
    dtype = plan.precision.input_dtype
    return Run(
        plan=plan, args=args, accelerator=accelerator, engine=engine, optimizer=optimizer, scheduler=scheduler,
        state=state, prof=prof, tracker=tracker, stop=lifecycle.StopRequest(plan.world_size), loader=loader,
        val_stream=data.ValidationStream(plan.val, data.eval_transform(plan.img_size), args.eval_batch_size, rank,
                                         plan.world_size, plan.loader.workers),
        to_train_input=data.OnDevice(device, dtype, mixup), to_eval_input=data.OnDevice(device, dtype),
        loss_fn=loss_fn, run_name=run_name, out_dir=out_dir, run_lock=run_lock, env=env, config=config,
        resumed_from_step=state.step)


def agree_on_resume(plan: Plan, rank: int) -> None:
    """Rank 0's choice of checkpoint is the launch's: a rank that sees another (an output directory that is
    not one shared filesystem, a checkpoint written meanwhile) stops the launch instead of loading it."""
    chosen = broadcast_object_list([str(plan.resume_from)])[0]
    if chosen != str(plan.resume_from):
        raise checkpoint.CheckpointError(
            f"rank {rank} would resume from {plan.resume_from}, rank 0 from {chosen}: every node must see the "
            "same --output-dir (a shared filesystem)")


def build_engine(args, plan: Plan, accelerator):
    """The model (identical initial weights on every rank), the recipe's AdamW (it unscales, clips and skips on
    the device: vitbench/step.py), the per-step cosine schedule and the DeepSpeed engine; resumed from the
    Plan's checkpoint."""
    set_seed(args.seed)
    model = timm.create_model(plan.model, **plan.model_kwargs)
    optimizer = make_optimizer(model.parameters(), precision=plan.precision, lr=plan.lr,
                               weight_decay=args.weight_decay, clip_grad=args.clip_grad,
                               loss_scaling=plan.loss_scaling, device=accelerator.device)
    # Stepped per optimizer update (FlagPerf steps per epoch): the same curve, without the staircase.
    scheduler = CosineLRScheduler(optimizer, t_initial=max(1, args.epochs * plan.steps_per_epoch - plan.warmup_steps),
                                  lr_min=args.min_lr, warmup_t=plan.warmup_steps,
                                  warmup_lr_init=plan.lr * args.warmup_lr_factor, warmup_prefix=True,
                                  t_in_epochs=False)
    engine, _ = accelerator.prepare(model, optimizer)
    attach(engine, optimizer, world_size=plan.world_size, zero_stage=plan.zero_stage)
    if args.compile:
        engine.compile()
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state, *([optimizer.scaler] if optimizer.scaler else []))
    if plan.resume_from:
        resume(accelerator, plan.resume_from, plan.universal, state)
    return engine, optimizer, scheduler, state


def build_profiler(args, plan: Plan, accelerator, env: dict) -> tuple[StepProfiler, dict]:
    """The step profiler, and what it was given (for results.json): FLOPs per image and the device's peak."""
    device = accelerator.device
    peak, peak_source = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else \
        peak_tflops(env["device_name"] if device.type == "cuda" else None, plan.precision.peak_class)
    flops = train_flops_per_sample(lambda: timm.create_model(plan.model, **plan.model_kwargs), plan.img_size)
    event_cls = get_accelerator().Event  # None on synchronous devices (CPU): host clock there
    prof = StepProfiler(global_batch=args.global_batch_size, world_size=plan.world_size,
                        warmup_steps=args.timing_warmup_steps, synchronize=get_accelerator().synchronize,
                        make_event=(lambda: event_cls(enable_timing=True)) if event_cls else None,
                        reduce_max=lambda values: reduce_max(values, device), flops_per_sample=flops,
                        peak_tflops_per_device=peak, memory_probe=DeviceMemoryMonitor(device).probe)
    return prof, {"flops_per_sample": flops, "peak_tflops_per_device": peak, "peak_tflops_source": peak_source}


def resume(accelerator, resume_from: Path, universal: bool, state: TrainState) -> None:
    load_from = resume_from
    if universal:  # another number of processes wrote it: load DeepSpeed's universal conversion
        if accelerator.is_main_process:
            checkpoint.to_universal(resume_from, log=accelerator.print)
        accelerator.wait_for_everyone()
        load_from = resume_from / checkpoint.UNIVERSAL
    try:
        accelerator.load_state(str(load_from))
    except Exception as e:
        raise checkpoint.CheckpointError(
            f"checkpoint {resume_from} does not load into this launch ({type(e).__name__}: {str(e)[:300]}); its "
            f"{checkpoint.MARKER} file records the settings it was written with") from None
    accelerator.print(f"resumed from {resume_from} at step {state.step}"
                      + (" (universal checkpoint: the number of processes changed)" if universal else ""))


def reduce_min(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized():
        t = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return t


def reduce_max(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


# ------------------------------------------------------------------------------------------------
# The run: the live objects and counters the loop touches, and the pieces it calls
# ------------------------------------------------------------------------------------------------
@dataclass
class Run:
    plan: Plan
    args: argparse.Namespace
    accelerator: Accelerator
    engine: object  # deepspeed.DeepSpeedEngine
    optimizer: object
    scheduler: CosineLRScheduler
    state: TrainState
    prof: StepProfiler
    tracker: Tracker
    stop: lifecycle.StopRequest
    loader: TrainLoader
    val_stream: data.ValidationStream
    to_train_input: data.OnDevice
    to_eval_input: data.OnDevice
    loss_fn: object
    run_name: str
    out_dir: Path
    run_lock: object
    env: dict
    config: dict
    resumed_from_step: int
    interrupted: bool = False
    reached_target: bool = False
    evals: list = field(default_factory=list)
    train_skipped: int = 0
    logits_dtype: torch.dtype | None = None
    loss_terms: int = 0

    def __post_init__(self):
        device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
        self.guard = DivergenceGuard(device, loss_scaler=bool(self.plan.precision.loss_scaler))
        self.outcome = StepOutcome(self.engine, self.optimizer)

    def close(self) -> None:
        """Stop the train loader; on an error exit, close W&B (a finished run's tracker is closed already)."""
        self.loader.close()
        self.tracker.abort()

    def over(self) -> bool:
        return self.state.step >= self.plan.total_steps or self.reached_target or self.interrupted

    def epoch_batches(self):
        """The rest of this epoch, one optimizer step's micro-batches at a time, each ready on the device.
        The profiler's data wait runs from asking for a step's batches to their being queued on the device:
        on a GPU the copy, normalization and mixup kernels are only queued there, and run before the step's
        start event, so their device time counts in neither data wait nor compute (it is in p_train)."""
        state, plan = self.state, self.plan
        steps = min(plan.steps_per_epoch - state.step_in_epoch, plan.total_steps - state.step)
        batches = self.loader.batches(steps * plan.grad_accum)
        for _ in range(steps):
            self.prof.data_start()
            micro = []
            for _ in range(plan.grad_accum):
                b = next(batches)
                self.train_skipped += b["skipped"]
                micro.append(self.to_train_input(b["images"], b["labels"]))
            yield micro
        if state.step_in_epoch >= plan.steps_per_epoch:
            state.epoch += 1
            state.step_in_epoch = 0

    def step_done(self, logits, nonfinite) -> None:
        state = self.state
        self.loss_terms += self.plan.grad_accum
        if self.logits_dtype is None:  # first step of this launch: is the precision what its label says?
            self.logits_dtype = logits.dtype
            self.plan.precision.verify(precision.in_effect(self.engine, logits.dtype))
        state.step += 1
        state.step_in_epoch += 1
        self.guard.step_done(state.step, nonfinite, self.outcome.skipped())
        self.scheduler.step_update(state.step)

    def check_finite(self) -> None:
        """All ranks agree on the first step the run cannot recover from, and stop before that step can reach
        a checkpoint, a log row or an evaluation."""
        self.guard.check(reduce_min=reduce_min, loss_scale=lambda: precision.loss_scale(self.engine))

    def log_row(self) -> None:
        self.check_finite()
        state = self.state
        row = self.prof.interval_row()
        row.update({
            M.LOSS: self.accelerator.reduce(self.loss_sum, reduction="mean").item() / self.loss_terms,
            M.LR: self.optimizer.param_groups[0]["lr"],
            M.GRAD_NORM: float(grad_norm) if (grad_norm := self.outcome.grad_norm()) is not None else None,
            M.LOSS_SCALE: precision.loss_scale(self.engine),
            M.EPOCH: state.epoch + state.step_in_epoch / self.plan.steps_per_epoch,
        })
        self.loss_sum.zero_()
        self.loss_terms = 0
        self.tracker.log_step(state.step, row)
        self.accelerator.print(format_row(state.step, self.plan.total_steps, row))

    def checkpoint_due(self) -> bool:
        every = self.args.checkpoint_every
        return bool(every) and self.state.step % every == 0 and self.state.step < self.plan.total_steps

    def save_checkpoint(self) -> None:
        self.check_finite()
        plan = self.plan
        meta = {"epoch": self.state.epoch, "world_size": plan.world_size, "zero_stage": plan.zero_stage,
                "global_batch_size": self.args.global_batch_size, "precision": plan.precision.label,
                "model": plan.model, "model_kwargs": plan.model_kwargs}
        # The floor of the free-space check before the first save (no earlier checkpoint's size known yet):
        # fp32 weights + two Adam moments.
        checkpoint.save(self.accelerator, self.out_dir / "checkpoints", self.state.step,
                        keep=self.args.keep_checkpoints, meta=meta, min_bytes=12 * plan.n_params)
        self.tracker.log_event("checkpoint", self.state.step)

    def eval_due(self) -> bool:
        state = self.state
        if self.interrupted:
            return False
        return (state.step_in_epoch == 0 and state.epoch % self.args.eval_every == 0) or \
            state.step >= self.plan.total_steps

    def evaluate(self) -> None:
        self.check_finite()  # a model whose loss went non-finite is not evaluated
        state, target = self.state, self.args.target_acc1
        final = evaluate(self.engine, self.val_stream, self.accelerator, self.to_eval_input, self.plan.img_size,
                         lockstep=self.plan.zero_stage == 3)
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
    skipped_only = 0  # samples dropped after a worker's last image come in a batch of no images
    for batch in data.validation_loader(stream, pin_memory=device.type == "cuda"):
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
    if lockstep:  # ZeRO-3 gathers parameters inside forward: every rank must run as many forwards
        pad = torch.zeros(1, 3, img_size, img_size, dtype=to_input.dtype, device=device)
        for _ in range(stream.max_batches_per_rank() - batches):
            model(pad)  # outputs discarded: padding is never counted
    sums[4] += skipped_only
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
    accelerator, state, plan = run.accelerator, run.state, run.plan
    if run.interrupted:
        accelerator.print(f"interrupted by {run.stop.signal_name or 'a signal on another rank'}: checkpoint of step "
                          f"{state.step} saved; relaunch with --resume auto --output-dir {run.out_dir}")
    timing = run.prof.summary()
    final = run.evals[-1] if run.evals else None
    e2e = reduce_max([time.time() - psutil.Process().create_time()], accelerator.device)[0]
    train_skipped = int(accelerator.reduce(torch.tensor(run.train_skipped, device=accelerator.device),
                                           reduction="sum").item())
    results = {
        "run_name": run.run_name, **plan.layout, "precision": plan.precision.label, "zero_stage": plan.zero_stage,
        "zero_stage_requested": plan.zero_stage_requested,
        "global_batch_size": run.args.global_batch_size, "global_step": state.step,
        "resumed_from_step": run.resumed_from_step, "epochs_done": state.epoch, "interrupted": run.interrupted,
        "loader": plan.loader.kind, "epoch_sampling": run.loader.epoch_sampling, "pass_coverage": plan.pass_coverage,
        "eval_samples": final[M.EVAL_SAMPLES] if final else 0, "val_num_samples": plan.val.num_samples,
        "final_acc1": final[M.ACC1] if final else None, "final_acc5": final[M.ACC5] if final else None,
        "val_loss": final[M.VAL_LOSS] if final else None, "reached_target": run.reached_target,
        "skipped_corrupt": {"train": train_skipped, "validation": final["skipped"] if final else 0},
        "e2e_time": e2e, **timing,
        "mem": f"{timing['mem_used_gib']:.1f}/{timing['mem_total_gib']:.1f}" if "mem_used_gib" in timing else None,
        "fix_hp": plan.fix_hp, "nccl_busbw_gbps": run.args.nccl_busbw,
        "precision_in_effect": precision.in_effect(run.engine, run.logits_dtype),
        "replica_checksums": replica_checksums(run.engine, plan.zero_stage),
        "evals": run.evals, "environment": run.env, "config": run.config, "plan": plan.to_json(),
    }
    if run.args.compile:  # reported apart; the steady figures leave it out, FlagPerf's whole windows keep it
        results["compile_s"] = timing.get("first_step_extra_s")
    if run.args.deepspeed_throughput_timer:  # an independent second opinion on p_core (it synchronizes each step)
        timer = run.engine.tput_timer
        results["deepspeed_throughput_timer"] = {"samples_per_sec": timer.avg_samples_per_sec(),
                                                 "start_step": timer.start_step}
    if accelerator.is_main_process:
        write_json_atomic(run.out_dir / "results.json", results)
        profile_dir = run.out_dir / "profile"
        run.tracker.finish({k: results[k] for k in SUMMARY_KEYS if k in results}, table_row(results),
                           [profile_dir] if profile_dir.is_dir() else [])
        print(f"results: {run.out_dir / 'results.json'}")
        print(f"e2e_time {e2e:.1f}s  p_whole {num(results['p_whole'], 1)}  p_train {num(results['p_train'], 1)}  "
              f"p_core {num(results['p_core'], 1)} img/s  final_acc1 {num(results['final_acc1'], 1)}  "
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
    cli()
