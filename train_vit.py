#!/usr/bin/env python
"""Train a Vision Transformer on ImageNet WebDataset shards with accelerate + DeepSpeed.

With no arguments this is FlagPerf's ViT-B/16 case (torchvision's recipe), e.g.
    accelerate launch --config_file accelerate_configs/1x8.yaml train_vit.py
and on a CPU, in minutes, on the embedded demo photos:
    python train_vit.py --demo
    accelerate launch --config_file accelerate_configs/cpu_1x2.yaml train_vit.py --demo

The story, top to bottom: flags -> Plan (every decision, checked before any work; vitbench/cli.py and
vitbench/plan.py) -> data, model, accelerate/DeepSpeed -> loop -> results. After planning this file reads
nothing but the Plan.
"""

import sys

from vitbench import cli

if __name__ == "__main__":  # a bad flag, or --help, answers in seconds: before the heavy imports below
    cli.parse_args(sys.argv[1:], __doc__)

import os
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
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler

from vitbench import dist, lifecycle, precision, results
from vitbench import metrics as M
from vitbench.checkpoint import CheckpointManager
from vitbench.data import loaders
from vitbench.data.loaders import TrainLoader
from vitbench.data.shardread import Readers, StreamStart
from vitbench.data.transforms import OnDevice, eval_transform
from vitbench.data.validation import ValidationStream
from vitbench.device import Device, pin_jit_build_tools
from vitbench.evaluator import Evaluator
from vitbench.files import write_json_atomic
from vitbench.guard import DivergenceGuard
from vitbench.metrics import DeviceMemoryMonitor
from vitbench.monitor import HardwareMonitor, combine, probe_sensors
from vitbench.optim import StepOutcome, attach, make_optimizer
from vitbench.plan import Loss, Plan
from vitbench.profiler import StepTimer, TraceWindow, train_flops_per_sample
from vitbench.runinfo import environment
from vitbench.tracking import Tracker

REPO = Path(__file__).resolve().parent
# torch.distributed's deprecation notice for a call inside DeepSpeed, printed on every rank.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated")


# ================================================================================================
# main: the whole story on one screen
# ================================================================================================
def main(argv=None) -> dict:
    plan = cli.plan(argv, __doc__)  # flags -> every decision and check, before any heavy work
    if plan.finished:  # --resume of a finished run: say so (once per node), change nothing
        if dist.is_node_leader():
            print(plan.finished)
        return {}
    run = setup(plan)  # data -> model -> accelerate/DeepSpeed engine -> profiler/tracking
    state, timer, measure = run.state, run.timer, plan.measurement
    timer.train_start()
    with closing(run):  # on any exit: loader workers stopped, W&B closed
        with TraceWindow(measure.profile_steps, state.step, run.out_dir, run.rank, timer.pause) as trace:
            while not run.over():
                for micro_batches in run.epoch_batches():  # a step's batches: on the device, normalized, mixed
                    timer.compute_start()
                    logits, nonfinite = train_step(run.engine, micro_batches, run.loss_fn, run.loss_sum)
                    timer.step_end()
                    state.step += 1
                    state.step_in_epoch += 1
                    run.step_done(logits, nonfinite)  # LR schedule, precision and divergence checks
                    trace.step(state.step)
                    if state.step % measure.log_interval == 0 or state.step == plan.total_steps:
                        run.log_row()
                    if run.stop.agreed():  # SIGTERM/SIGUSR1/SIGINT on any rank: checkpoint below, exit 75
                        run.interrupted = True
                        break
                    if run.checkpoints.due(state.step):
                        with timer.pause("checkpoint"):
                            run.save_checkpoint()
                if not run.interrupted and state.step_in_epoch >= plan.steps_per_epoch:  # a whole epoch
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                if not run.interrupted and run.evaluator.due(state.step, state.step_in_epoch, state.epoch):
                    with timer.pause("eval"):
                        run.evaluate()
        timer.train_end()
        run.stop.finish()
        run.save_checkpoint()
        return finish(run)


# ------------------------------------------------------------------------------------------------
# One training step: the micro-batches of one optimizer step, forward + backward + step
# ------------------------------------------------------------------------------------------------
def train_step(engine, micro_batches, loss_fn, loss_sum):
    """Returns the last logits and a device flag: was any micro-batch's loss non-finite (no sync here).
    The DeepSpeed engine is driven directly: it accumulates gradients over micro-batches and, at the
    accumulation boundary, calls optim.RecipeAdamW, which unscales, clips and skips on the device; nothing
    else wraps the hot path and nothing in it reads a value back (tests/unit/test_optim.py counts)."""
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
def setup(plan: Plan) -> "Run":
    os.environ.update(plan.vendor_env)  # a vendor profile's NCCL_*/HCCL_*/... variables, before the process group
    pin_jit_build_tools()  # DeepSpeed's JIT-built ops: one build, by this environment's ninja, serves every launch
    device_layer = Device()  # the accelerator, through DeepSpeed's accelerator API: backend, events, memory
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=plan.ds_config),
                              kwargs_handlers=[InitProcessGroupKwargs(backend=device_layer.backend)],
                              gradient_accumulation_steps=plan.grad_accum)
    device, rank, recipe = accelerator.device, accelerator.process_index, plan.recipe
    for note in plan.warnings if accelerator.is_main_process else ():
        print(f"warning: {note}", file=sys.stderr)
    precision.set_tf32(plan.precision.tf32)
    run_name = broadcast_object_list([plan.run_name or plan.default_run_name(time.strftime("%Y%m%d-%H%M%S"))])[0]
    out_dir = plan.run_dir(run_name, REPO)
    run_lock = lifecycle.RunLock(out_dir) if accelerator.is_main_process else None  # one run per output dir
    checkpoints = CheckpointManager.for_plan(plan, out_dir, accelerator, broadcast=broadcast_object_list)
    checkpoints.agree_on_resume(plan.resume_from)

    engine, optimizer, scheduler, state = build_engine(plan, accelerator, checkpoints)
    set_seed(recipe.seed + rank + 1000 * state.step)  # augmentation differs per rank, and after a resume
    mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.smoothing,
                  num_classes=plan.train.num_classes) if recipe.loss.mixes else None
    loss_fn = {Loss.SOFT_TARGET: SoftTargetCrossEntropy,
               Loss.LABEL_SMOOTHING: lambda: LabelSmoothingCrossEntropy(recipe.smoothing),
               Loss.CROSS_ENTROPY: torch.nn.CrossEntropyLoss}[recipe.loss]()

    env = environment(device_layer, REPO)
    # power, energy, temperature and utilisation in a background thread (absent sensors recorded as absent)
    monitor = HardwareMonitor(*probe_sensors(device_layer, accelerator.local_process_index)).start()
    timer, flops = build_step_timer(plan, accelerator, device_layer)
    attn = getattr(getattr(engine.module, "blocks", [None])[0], "attn", None)
    config = {"flops_per_sample": flops, "fused_attn": getattr(attn, "fused_attn", None),
              "optimizer": "vitbench.optim.RecipeAdamW (torch fused AdamW; unscale, clip and skip on the device)"}
    tracker = Tracker(plan.tracking, enabled=accelerator.is_main_process, run_dir=out_dir, name=run_name,
                      config={**config, "env": env, "plan": plan.to_json()})
    accelerator.print(f"{run_name}: {plan.model} {plan.img_size}px, {plan.world_size} device(s), "
                      f"{plan.precision.label}, ZeRO-{plan.zero_stage}, global batch {recipe.global_batch_size} = "
                      f"{recipe.batch_size} x {plan.world_size} x {plan.grad_accum} accum, {plan.total_steps} steps "
                      f"({plan.steps_per_epoch}/epoch), lr {recipe.lr:.3g}, loader {plan.loader.kind}")
    loader = loaders.build(plan.loader, plan.train, readers=Readers(rank, plan.world_size, plan.loader.workers),
                           start=StreamStart(state.epoch, state.step_in_epoch, state.step), seed=recipe.seed,
                           optimizer_steps_per_epoch=plan.steps_per_epoch, grad_accum=plan.grad_accum,
                           device=device, pin_memory=device_layer.pins_memory)
    dtype = plan.precision.input_dtype
    val_stream = ValidationStream(plan.val, eval_transform(plan.img_size), plan.evaluation.batch_size, rank,
                                  plan.world_size, plan.loader.workers)
    evaluator = Evaluator(plan.evaluation, val_stream, OnDevice(device, dtype), device=device,
                          total_steps=plan.total_steps, reduce_sum=lambda t: accelerator.reduce(t, reduction="sum"),
                          lockstep=plan.zero_stage == 3, img_size=plan.img_size, pin_memory=device_layer.pins_memory)
    return Run(
        plan=plan, accelerator=accelerator, engine=engine, optimizer=optimizer, scheduler=scheduler, state=state,
        timer=timer, tracker=tracker, stop=lifecycle.StopRequest(plan.world_size), loader=loader,
        to_train_input=OnDevice(device, dtype, mixup), loss_fn=loss_fn, checkpoints=checkpoints, evaluator=evaluator,
        run_name=run_name, out_dir=out_dir, run_lock=run_lock, env=env, config=config, resumed_from_step=state.step,
        monitor=monitor)


def build_engine(plan: Plan, accelerator, checkpoints: CheckpointManager):
    """The model (identical initial weights on every rank), the recipe's AdamW (it unscales, clips and skips on
    the device: vitbench/optim.py), the per-step cosine schedule and the DeepSpeed engine; resumed from the
    Plan's checkpoint."""
    recipe = plan.recipe
    set_seed(recipe.seed)
    model = timm.create_model(plan.model, **plan.model_kwargs)
    optimizer = make_optimizer(model.parameters(), precision=plan.precision, lr=recipe.lr,
                               weight_decay=recipe.weight_decay, clip_grad=recipe.clip_grad,
                               loss_scaling=plan.loss_scaling, device=accelerator.device)
    # Stepped per optimizer update (FlagPerf steps per epoch): the same curve, without the staircase.
    scheduler = CosineLRScheduler(optimizer, t_initial=recipe.decay_steps, lr_min=recipe.min_lr,
                                  warmup_t=recipe.warmup_steps, warmup_lr_init=recipe.warmup_lr, warmup_prefix=True,
                                  t_in_epochs=False)
    engine, _ = accelerator.prepare(model, optimizer)
    attach(engine, optimizer, world_size=plan.world_size, zero_stage=plan.zero_stage)
    if plan.measurement.compile:
        engine.compile()
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state, *([optimizer.scaler] if optimizer.scaler else []))
    if plan.resume_from:
        checkpoints.load(plan.resume_from, plan.universal)
        accelerator.print(f"resumed from {plan.resume_from} at step {state.step}"
                          + (" (universal checkpoint: the number of processes changed)" if plan.universal else ""))
    return engine, optimizer, scheduler, state


def build_step_timer(plan: Plan, accelerator, device_layer: Device) -> tuple[StepTimer, float]:
    """The step profiler, and the FLOPs per image it was given (PyTorch's FLOP counter on a meta-device model)."""
    device, measured = accelerator.device, plan.measurement
    flops = train_flops_per_sample(lambda: timm.create_model(plan.model, **plan.model_kwargs), plan.img_size)
    timer = StepTimer(global_batch=plan.recipe.global_batch_size, world_size=plan.world_size,
                        warmup_steps=measured.timing_warmup_steps, synchronize=device_layer.synchronize,
                        make_event=device_layer.make_event(),  # None on synchronous devices (CPU): host clock
                        reduce_max=lambda values: dist.reduce_max(values, device), flops_per_sample=flops,
                        peak_tflops_per_device=measured.peak_tflops,
                        memory_probe=DeviceMemoryMonitor(device_layer, device).probe)
    return timer, flops


# ------------------------------------------------------------------------------------------------
# The run: the live objects and the counters the loop touches; components decide what is due
# ------------------------------------------------------------------------------------------------
@dataclass
class Run:
    plan: Plan
    accelerator: Accelerator
    engine: object  # deepspeed.DeepSpeedEngine
    optimizer: object
    scheduler: CosineLRScheduler
    state: TrainState
    timer: StepTimer
    tracker: Tracker
    stop: lifecycle.StopRequest
    loader: TrainLoader
    to_train_input: OnDevice
    loss_fn: object
    checkpoints: CheckpointManager
    evaluator: Evaluator
    run_name: str
    out_dir: Path
    run_lock: object
    env: dict
    config: dict
    resumed_from_step: int
    monitor: HardwareMonitor
    interrupted: bool = False
    train_skipped: int = 0
    logits_dtype: torch.dtype | None = None
    loss_terms: int = 0
    rank: int = field(init=False)

    def __post_init__(self):
        device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
        self.guard = DivergenceGuard(device, loss_scaler=bool(self.plan.precision.loss_scaler))
        self.outcome = StepOutcome(self.engine, self.optimizer)

    def close(self) -> None:
        """Stop the train loader and the hardware monitor; on an error exit, close W&B (a finished run's tracker is
        closed already)."""
        self.loader.close()
        self.monitor.stop()
        self.tracker.abort()

    def over(self) -> bool:
        return self.state.step >= self.plan.total_steps or self.evaluator.reached_target or self.interrupted

    def epoch_batches(self):
        """The rest of this epoch, one optimizer step's micro-batches at a time, each ready on the device.
        The profiler's data wait runs from asking for a step's batches to their being queued on the device:
        on a GPU the copy, normalization and mixup kernels are only queued there, and run before the step's
        start event, so their device time counts in neither data wait nor compute (it is in p_train)."""
        state, plan = self.state, self.plan
        steps = min(plan.steps_per_epoch - state.step_in_epoch, plan.total_steps - state.step)
        batches = self.loader.batches(steps * plan.grad_accum)
        for _ in range(steps):
            self.timer.data_start()
            micro = []
            for _ in range(plan.grad_accum):
                b = next(batches)
                self.train_skipped += b["skipped"]
                micro.append(self.to_train_input(b["images"], b["labels"]))
            yield micro

    def step_done(self, logits, nonfinite) -> None:
        """After main() counted the step: its loss terms, the LR schedule, the precision (first step) and the
        divergence guard."""
        state = self.state
        self.loss_terms += self.plan.grad_accum
        if self.logits_dtype is None:  # first step of this launch: is the precision what its label says?
            self.logits_dtype = logits.dtype
            self.plan.precision.verify(precision.in_effect(self.engine, logits.dtype))
        self.guard.step_done(state.step, nonfinite, self.outcome.skipped())
        self.scheduler.step_update(state.step)

    def check_finite(self) -> None:
        """All ranks agree on the first step the run cannot recover from, and stop before that step can reach
        a checkpoint, a log row or an evaluation."""
        self.guard.check(reduce_min=dist.reduce_min, loss_scale=lambda: precision.loss_scale(self.engine))

    def log_row(self) -> None:
        self.check_finite()
        state = self.state
        row = self.timer.interval_row()
        row.update({
            M.LOSS: self.accelerator.reduce(self.loss_sum, reduction="mean").item() / self.loss_terms,
            M.LR: self.optimizer.param_groups[0]["lr"],
            M.GRAD_NORM: float(grad_norm) if (grad_norm := self.outcome.grad_norm()) is not None else None,
            M.LOSS_SCALE: precision.loss_scale(self.engine),
            M.EPOCH: state.epoch + state.step_in_epoch / self.plan.steps_per_epoch,
            **self.monitor.latest_row(),  # this rank's device: power, temperature, utilisation, clock
        })
        self.loss_sum.zero_()
        self.loss_terms = 0
        self.tracker.log_step(state.step, row)
        self.accelerator.print(format_row(state.step, self.plan.total_steps, row))

    def save_checkpoint(self) -> None:
        self.check_finite()
        self.checkpoints.save(self.state.step, self.state.epoch)
        cost = self.checkpoints.saves[-1]
        self.tracker.log_event("checkpoint", self.state.step, {"seconds": cost["seconds"], "bytes": cost["bytes"]})

    def evaluate(self) -> None:
        self.check_finite()  # a model whose loss went non-finite is not evaluated
        state, target = self.state, self.plan.evaluation.target_acc1
        final = self.evaluator.evaluate(self.engine, state.epoch, state.step)
        self.tracker.log_eval(state.epoch, state.step, final)
        self.accelerator.print(f"eval epoch {state.epoch} step {state.step}: top-1 {final[M.ACC1]:.2f}  "
                               f"top-5 {final[M.ACC5]:.2f}  loss {final[M.VAL_LOSS]:.4f}  "
                               f"({final[M.EVAL_SAMPLES]} images)")
        if self.evaluator.reached_target:
            self.accelerator.print(f"reached target top-1 {target}")


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------
def finish(run: Run) -> dict:
    """results.json (vitbench/results.py says what each key is), the W&B summary and table row."""
    accelerator, state, plan = run.accelerator, run.state, run.plan
    if run.interrupted:
        accelerator.print(f"interrupted by {run.stop.signal_name or 'a signal on another rank'}: checkpoint of step "
                          f"{state.step} saved; relaunch with --resume auto --output-dir {run.out_dir}")
    device = accelerator.device
    ds_timer = run.engine.tput_timer if plan.measurement.deepspeed_throughput_timer else None
    run.monitor.stop()
    timing = run.timer.summary()
    hardware = combine(gather_object([run.monitor.summary(run.timer.train_start_t, run.timer.train_end_t)]),
                       timing["train_samples"], run.monitor.interval_s)
    out = results.build(
        plan=plan, run_name=run.run_name, global_step=state.step, resumed_from_step=run.resumed_from_step,
        epochs_done=state.epoch, interrupted=run.interrupted, evals=run.evaluator.evals,
        reached_target=run.evaluator.reached_target, checkpoint_saves=run.checkpoints.saves,
        train_skipped=int(accelerator.reduce(torch.tensor(run.train_skipped, device=device), reduction="sum").item()),
        e2e_time=dist.reduce_max([time.time() - psutil.Process().create_time()], device)[0], timing=timing,
        hardware=hardware,
        precision_in_effect=precision.in_effect(run.engine, run.logits_dtype),
        replica_checksums=dist.replica_checksums(run.engine.module, plan.zero_stage), environment=run.env,
        config=run.config,
        deepspeed_throughput_timer={"samples_per_sec": ds_timer.avg_samples_per_sec(),
                                    "start_step": ds_timer.start_step} if ds_timer else None)
    if accelerator.is_main_process:
        write_json_atomic(run.out_dir / results.RESULTS_FILE, out)
        profile_dir = run.out_dir / "profile"
        run.tracker.finish(results.summary(out), results.table(out), [profile_dir] if profile_dir.is_dir() else [])
        print(f"results: {run.out_dir / results.RESULTS_FILE}")
        print(results.headline(out))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if run.interrupted:
        sys.exit(lifecycle.EXIT_INTERRUPTED)
    return out


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
    cli.run(main)
