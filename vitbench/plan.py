"""The Plan: every decision a launch makes, made once, before any heavy work.

`make_plan` is one function of the flags, the launcher's environment, the machine's facts, the data
directory and the checkpoint directory. It only reads; it raises a UserError subclass naming the flag, file
or checkpoint that is wrong, and the command-line edge turns that into one line and exit status 2. What it
returns is frozen and is the trainer's only input: the trainer creates objects from it and never decides
again, and each component gets its own part (the recipe, the checkpoint and evaluation cadence, what is
measured, where metrics go). `results.json` records all of it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

from vitbench import checkpoint, dsconfig, lifecycle, tracking
from vitbench.checkpoint import CheckpointSpec
from vitbench.data import open_data_dir
from vitbench.data.loaders import LoaderSpec
from vitbench.data.shardformat import ShardSet
from vitbench.data.transforms import describe, train_transform
from vitbench.errors import UserError
from vitbench.evaluator import EvalSpec
from vitbench.files import writable_problem
from vitbench.peaks import peak_tflops
from vitbench.precision import SPECS, PrecisionSpec
from vitbench.runinfo import MachineFacts, layout
from vitbench.tracking import TrackingSpec

MAX_DEFAULT_WORKERS = 16  # JPEG decoding needs many cores per GPU (FlagPerf uses 16)
# timm create_model arguments that flags own: setting them through --model-kwargs would contradict a flag.
FLAG_OWNED_MODEL_KWARGS = {"num_classes": "the data's _info.json", "img_size": "--img-size",
                           "patch_size": "--patch-size"}


class PlanError(UserError):
    pass


@dataclass(frozen=True)
class Recipe:
    """What an optimizer step computes: batch, AdamW, the per-step cosine schedule, the loss and mixing."""

    global_batch_size: int
    batch_size: int  # per device and micro-batch
    lr: float
    weight_decay: float
    clip_grad: float  # 0: no clipping
    epochs: int
    warmup_steps: int
    warmup_lr: float  # the linear warm-up starts here
    decay_steps: int  # the cosine's length, after the warm-up
    min_lr: float
    loss: Loss
    smoothing: float
    mixup: float
    cutmix: float
    auto_augment: str  # --aa as given (transforms.AugmentPolicy)
    train_transform: str  # what a worker does to a train image, as text (transforms.describe)
    seed: int


class Loss(StrEnum):
    """The recipe's loss. Mixup/cutmix make soft targets (smoothing folded in); otherwise label smoothing, or
    plain cross-entropy. Its value is what results.json records."""

    SOFT_TARGET = "soft-target-cross-entropy"  # with timm's Mixup making the targets
    LABEL_SMOOTHING = "label-smoothing-cross-entropy"
    CROSS_ENTROPY = "cross-entropy"

    @classmethod
    def for_recipe(cls, *, mixup: float, cutmix: float, smoothing: float) -> "Loss":
        if mixup or cutmix:
            return cls.SOFT_TARGET
        return cls.LABEL_SMOOTHING if smoothing else cls.CROSS_ENTROPY

    @property
    def mixes(self) -> bool:
        """Batches go through timm's Mixup (mixup or cutmix) before the loss."""
        return self is Loss.SOFT_TARGET


@dataclass(frozen=True)
class Measurement:
    """What is measured and how: log rows, the steady-state window, a trace, MFU's peak, compile, extras."""

    log_interval: int  # steps between log rows
    timing_warmup_steps: int  # steps left out of the *_steady figures
    profile_steps: tuple[int, int] | None  # torch.profiler trace of steps A..B
    peak_tflops: float | None  # one device's dense peak for MFU; None: unknown (no MFU)
    peak_tflops_source: str | None
    compile: bool
    deepspeed_throughput_timer: bool
    nccl_busbw_gbps: float | None  # measured by the user with nccl-tests, recorded beside the scaling figures


@dataclass(frozen=True)
class Plan:
    world_size: int
    nnodes: int
    nproc_per_node: int
    model: str
    model_kwargs: dict  # everything timm.create_model gets besides the name
    img_size: int
    n_params: int
    precision: PrecisionSpec
    loader: LoaderSpec
    train: ShardSet = field(repr=False)
    val: ShardSet = field(repr=False)
    ds_config: dict = field(repr=False)
    recipe: Recipe
    checkpoints: CheckpointSpec
    evaluation: EvalSpec
    measurement: Measurement
    tracking: TrackingSpec
    zero_stage: int = 0
    grad_accum: int = 1
    loss_scaling: dict | None = None  # amp: optim.LossScaler's init_scale and growth_interval
    zero_stage_requested: int = 0  # the config's or --zero-stage's (one process runs ZeRO-0 instead)
    steps_per_epoch: int = 1
    total_steps: int = 1
    run_name: str | None = None  # None: a default name with a timestamp, agreed by the ranks at start
    output_dir: Path | None = None  # None: runs/<run name>
    resume_from: Path | None = None
    universal: bool = False  # resume through DeepSpeed's universal checkpoint (the layout changed)
    finished: str | None = None  # --resume of a run that already finished: what to say instead of training
    epoch_sampling: str = ""  # how the loader draws an epoch's samples (loaders.LoaderSpec.epoch_sampling)
    pass_coverage: float | None = None  # wds, permuted epochs: the share of the split a pass reads
    data: dict = field(default_factory=dict)  # the data's identity: source, revision, sha256 of _info.json
    fix_hp: dict = field(default_factory=dict)  # the vendor's overrides and recipe flags changed (the table's fix_hp)
    vendor: dict | None = None  # the vendor profile applied (vitbench.vendor.VendorProfile.to_json), or None
    vendor_env: dict = field(default_factory=dict)  # its environment, set in every rank before the process group
    warnings: tuple[str, ...] = ()

    @property
    def layout(self) -> dict:
        return {"world_size": self.world_size, "nnodes": self.nnodes, "nproc_per_node": self.nproc_per_node}

    def default_run_name(self, timestamp: str) -> str:
        layout = f"{self.nnodes}x{self.nproc_per_node}"
        return f"{self.model}_{layout}_{self.precision.label}_z{self.zero_stage}_{timestamp}"

    def run_dir(self, run_name: str, repo: Path) -> Path:
        return self.output_dir or Path(repo) / "runs" / run_name

    def to_json(self) -> dict:
        return {**self.layout, "model": self.model, "model_kwargs": self.model_kwargs, "img_size": self.img_size,
                "n_params": self.n_params, "precision": self.precision.to_json(), "loader": self.loader.to_json(),
                "data": {**self.data, "train_shards": len(self.train.urls), "train_samples": self.train.num_samples,
                         "validation_shards": len(self.val.urls), "validation_samples": self.val.num_samples,
                         "num_classes": self.train.num_classes},
                "deepspeed_config": self.ds_config, "zero_stage": self.zero_stage, "grad_accum_steps": self.grad_accum,
                "loss_scaling": self.loss_scaling, "zero_stage_requested": self.zero_stage_requested,
                "recipe": asdict(self.recipe), "checkpoints": asdict(self.checkpoints),
                "evaluation": asdict(self.evaluation), "measurement": asdict(self.measurement),
                "tracking": asdict(self.tracking), "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "epoch_sampling": self.epoch_sampling,
                "pass_coverage": self.pass_coverage,
                "output_dir": str(self.output_dir) if self.output_dir else None,
                "resume_from": str(self.resume_from) if self.resume_from else None, "universal": self.universal,
                "fix_hp": self.fix_hp, "vendor": self.vendor, "warnings": list(self.warnings)}


def make_plan(args, environ, machine: MachineFacts, repo: Path) -> Plan:
    """The Plan for ARGS (train_vit.py's parsed flags) under the launcher's ENVIRON on MACHINE."""
    lay = layout(environ)
    world, per_node = lay["world_size"], lay["nproc_per_node"]
    warnings = []
    if lay["nnodes"] > 1 and not environ.get("GLOO_SOCKET_IFNAME") and (machine.host_ip or "").startswith("127."):
        raise PlanError(f"this host's name resolves to the loopback address {machine.host_ip}: the other nodes "
                        "cannot reach a process group bound to it; set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME) "
                        "to the interface that connects the nodes, e.g. GLOO_SOCKET_IFNAME=eth0")
    per_step = args.batch_size * world
    if args.global_batch_size % per_step:
        raise PlanError(f"--global-batch-size {args.global_batch_size} is not a multiple of --batch-size "
                        f"{args.batch_size} x {world} devices")
    if (args.mixup or args.cutmix) and args.batch_size % 2:
        raise PlanError(f"mixup/cutmix need an even --batch-size, got {args.batch_size}")
    if args.resume == "auto" and not (args.output_dir or args.run_name):
        raise PlanError("--resume auto needs the run's --output-dir (or --run-name): default run names carry a "
                        "timestamp")
    workers = args.workers if args.workers is not None else \
        max(1, min(MAX_DEFAULT_WORKERS, machine.cpus // per_node - 1))
    if per_node * max(workers, 1) > machine.cpus:
        warnings.append(f"{per_node} ranks x {workers} loader workers on {machine.cpus} usable CPUs: the loaders "
                        "will compete for cores (lower --workers, or give the job more CPUs)")
    if args.wandb != "off":
        tracking.init_timeout(environ)
    asked = accelerate_launch_settings(args, environ, per_step)
    precision = SPECS[args.precision or asked.get("precision") or default_precision(lay["nnodes"], machine)]
    precision.check_supported(machine)
    data_dir = open_data_dir(args.data_dir, loader_kind=args.loader, environ=environ)
    train, val, data = data_dir.train, data_dir.val, data_dir.identity
    model_kwargs, n_params = _model(args, train.num_classes)
    loader = LoaderSpec(args.loader, workers, args.batch_size, args.aug_repeats, args.aa, model_kwargs["img_size"])
    loader.check()
    warnings += loader.start_warnings(train, world)
    output_dir = Path(args.output_dir) if args.output_dir else \
        Path(repo) / "runs" / args.run_name if args.run_name else None
    # a real write now, before the process group, accelerate and DeepSpeed take their minute
    if problem := writable_problem(output_dir or Path(repo) / "runs"):
        raise PlanError(f"{output_dir or Path(repo) / 'runs'}: cannot create the output directory or write in it "
                        f"({problem}); pick a writable --output-dir")
    resume_from = checkpoint.resolve_resume(args.resume, output_dir / checkpoint.CHECKPOINTS_DIR if output_dir else None,
                                            log=warnings.append)
    if output_dir is not None and not args.resume and (held := lifecycle.held_run(output_dir)):
        raise PlanError(f"{output_dir} holds a run already ({held}): --resume auto continues it; a new run needs a "
                        "new --output-dir (or --run-name)")
    marker = checkpoint.read_marker(resume_from) if resume_from is not None else {}
    checkpoint.check_data(marker, data)
    ds_path = dsconfig.config_path(args.deepspeed_config, environ)
    profile = args.vendor_profile

    def ds_build(stage):
        return dsconfig.build(ds_path, micro_batch=args.batch_size, grad_accum=args.global_batch_size // per_step,
                              world_size=world, clip_grad=args.clip_grad, precision=precision, zero_stage=stage,
                              throughput_timer=args.deepspeed_throughput_timer,
                              override=profile.deepspeed if profile else None)
    ds_config = ds_build(args.zero_stage if args.zero_stage is not None else asked.get("zero_stage"))
    zero_stage = requested_stage = ds_config["zero_optimization"]["stage"]
    if world == 1 and zero_stage > 0 and _zero_is_pure_overhead(ds_config, precision, (marker or {}).get("zero_stage")):
        warnings.append(f"ZeRO-{zero_stage} partitions across processes; with one it only adds copies and memory, "
                        "so this launch runs ZeRO-0, which applies the same update")
        ds_config, zero_stage = ds_build(0), 0
    loss_scaling = dsconfig.amp_loss_scaling(ds_path) if precision.loss_scaler == "vitbench" else None
    if precision.half_weights and ds_config["gradient_accumulation_steps"] > 1 and zero_stage == 0:
        raise PlanError(f"--precision {precision.label} with {ds_config['gradient_accumulation_steps']} micro-batches "
                        "per step at ZeRO-0 would sum their gradients in 16 bits: DeepSpeed sums them in fp32 only "
                        "under ZeRO 1-3; use --zero-stage 1 (or a larger --batch-size)")
    universal = resume_from is not None and checkpoint.check_layout(
        marker, world_size=world, zero_stage=zero_stage,
        global_batch=args.global_batch_size, precision=precision.label,
        model={"model": args.model, "model_kwargs": model_kwargs})
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    steps_per_epoch = max(1, train.num_samples // args.global_batch_size)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    finished = lifecycle.finished_run(output_dir, total_steps) if args.resume and output_dir else None
    grad_accum = ds_config["gradient_accumulation_steps"]
    return Plan(
        **lay, model=args.model, model_kwargs=model_kwargs, img_size=loader.img_size, n_params=n_params,
        precision=precision, loader=loader, train=train, val=val, ds_config=ds_config, zero_stage=zero_stage,
        grad_accum=grad_accum, loss_scaling=loss_scaling, zero_stage_requested=requested_stage,
        recipe=_recipe(args, steps_per_epoch, loader.img_size),
        checkpoints=CheckpointSpec(args.checkpoint_every, args.keep_checkpoints),
        evaluation=EvalSpec(args.eval_every, args.eval_batch_size, args.target_acc1),
        measurement=_measurement(args, machine, precision, warnings),
        tracking=TrackingSpec(args.wandb, args.wandb_project, args.wandb_entity, args.wandb_group),
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, finished=finished,
        epoch_sampling=loader.epoch_sampling(train, world),
        pass_coverage=loader.pass_coverage(train, world, steps_per_epoch * grad_accum),
        run_name=args.run_name, output_dir=output_dir, resume_from=resume_from, universal=universal, data=data,
        fix_hp=dict(args.fix_hp), vendor=profile.to_json() if profile else None,
        vendor_env=dict(profile.env) if profile else {}, warnings=tuple(warnings))


def _recipe(args, steps_per_epoch: int, img_size: int) -> Recipe:
    lr = args.lr or args.lr_base * args.global_batch_size / args.lr_base_size  # linear scaling
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    loss = Loss.for_recipe(mixup=args.mixup, cutmix=args.cutmix, smoothing=args.smoothing)
    return Recipe(global_batch_size=args.global_batch_size, batch_size=args.batch_size, lr=lr,
                  weight_decay=args.weight_decay, clip_grad=args.clip_grad, epochs=args.epochs,
                  warmup_steps=warmup_steps, warmup_lr=lr * args.warmup_lr_factor,
                  decay_steps=max(1, args.epochs * steps_per_epoch - warmup_steps), min_lr=args.min_lr, loss=loss,
                  smoothing=args.smoothing, mixup=args.mixup, cutmix=args.cutmix, auto_augment=args.aa,
                  train_transform=describe(train_transform(img_size, args.aa)), seed=args.seed)


def _measurement(args, machine: MachineFacts, precision: PrecisionSpec, warnings: list[str]) -> Measurement:
    if args.peak_tflops:
        peak, source = args.peak_tflops, "--peak-tflops"
    else:  # the device's datasheet figure; none for a device the table does not know (no MFU, said once)
        peak, source = peak_tflops(machine.device_name, precision.peak_class)
        if peak is None:
            warnings.append(f"no {precision.peak_class} peak TFLOP/s is known for this device ({machine.device_name}): "
                            "MFU is left out; give its datasheet's dense figure with --peak-tflops")
    return Measurement(log_interval=args.log_interval, timing_warmup_steps=args.timing_warmup_steps,
                       profile_steps=args.profile_steps, peak_tflops=peak, peak_tflops_source=source,
                       compile=args.compile, deepspeed_throughput_timer=args.deepspeed_throughput_timer,
                       nccl_busbw_gbps=args.nccl_busbw)


def _zero_is_pure_overhead(ds_config: dict, precision, checkpoint_stage: int | None) -> bool:
    """At one process ZeRO partitions nothing; it still pays where it offloads to CPU memory, where fp16 weights
    need it to sum accumulated gradients in fp32, and where a ZeRO checkpoint is resumed in place."""
    zero = ds_config["zero_optimization"]
    offloads = any((zero.get(k) or {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param"))
    fp32_accumulation = precision.half_weights and ds_config["gradient_accumulation_steps"] > 1
    return not (offloads or fp32_accumulation or checkpoint_stage)


# accelerate's --mixed_precision under DeepSpeed -> our label: 16-bit autocast over fp32 weights (fp16 with
# loss scaling). accelerate's own "no" is its default, written whether or not the user asked: it means nothing.
ACCELERATE_PRECISION = {"fp16": "amp", "bf16": "bf16"}


def accelerate_launch_settings(args, environ, per_step: int) -> dict:
    """What `accelerate launch --mixed_precision / --zero_stage / --gradient_accumulation_steps /
    --gradient_clipping` (or the same keys in its config) asked for, as our settings. accelerate itself
    ignores them once it is given a DeepSpeed config, so here they are applied, or refused where they
    contradict our flags: {"precision": label, "zero_stage": N}, the keys that were asked."""
    asked = {}
    mixed = environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mixed != "no":
        if mixed not in ACCELERATE_PRECISION:
            raise PlanError(f"accelerate launch --mixed_precision {mixed}: not a precision of this trainer; use "
                            "--precision fp32|tf32|amp|fp16|bf16")
        asked["precision"] = ACCELERATE_PRECISION[mixed]
        if args.precision and args.precision != asked["precision"]:
            raise PlanError(f"accelerate launch --mixed_precision {mixed} (--precision {asked['precision']}) "
                            f"contradicts --precision {args.precision}: give one of them")
    if (stage := environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")) is not None:
        if stage not in ("0", "1", "2", "3"):
            raise PlanError(f"accelerate launch --zero_stage {stage}: ZeRO stages are 0 to 3")
        asked["zero_stage"] = int(stage)
        if args.zero_stage is not None and args.zero_stage != int(stage):
            raise PlanError(f"accelerate launch --zero_stage {stage} contradicts --zero-stage {args.zero_stage}: "
                            "give one of them")
    derived = args.global_batch_size // per_step
    if environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto") not in ("auto", str(derived)):
        raise PlanError(f"accelerate launch --gradient_accumulation_steps "
                        f"{environ['ACCELERATE_GRADIENT_ACCUMULATION_STEPS']} contradicts the recipe's "
                        f"{derived} (--global-batch-size {args.global_batch_size} / (--batch-size {args.batch_size} x "
                        f"{per_step // args.batch_size} devices)): change those flags instead")
    clip = environ.get("ACCELERATE_GRADIENT_CLIPPING", "auto")
    if clip != "auto" and _number(clip) != args.clip_grad:
        raise PlanError(f"accelerate launch --gradient_clipping {clip} contradicts --clip-grad {args.clip_grad}: "
                        "use --clip-grad")
    return asked


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def default_precision(nnodes: int, machine: MachineFacts) -> str:
    """--precision when none is given: amp (FlagPerf's rows) on one node; bf16 across nodes where the device has
    it: no loss scale to back off and no overflow skips across the nodes (both are autocast over fp32 weights,
    and DeepSpeed's torch_autocast mode reduces the Linear layers' gradients in the 16-bit dtype for either)."""
    return "bf16" if nnodes > 1 and machine.bf16 else "amp"


def _model(args, num_classes: int) -> tuple[dict, int]:
    """timm.create_model's arguments (NUM_CLASSES: the data's), tried on the meta
    device (no memory, no compute) so that a bad name or argument is refused at start; and the parameter count.
    The trainer trains timm's Vision Transformers (the FLOP count, fused attention and the recipe assume one);
    the image size is the model's own unless --img-size says otherwise."""
    import timm
    import torch
    from timm.models.vision_transformer import VisionTransformer

    if not timm.is_model(args.model):
        raise PlanError(f"unknown model '{args.model}': {SUPPORTED_MODELS}")
    clash = sorted(set(args.model_kwargs) & set(FLAG_OWNED_MODEL_KWARGS))
    if clash:
        raise PlanError(f"--model-kwargs {clash[0]}=... is set by {FLAG_OWNED_MODEL_KWARGS[clash[0]]}; use that "
                        "instead")

    def build(**kwargs):
        with torch.device("meta"):
            return timm.create_model(args.model, **kwargs)
    kwargs = dict(num_classes=num_classes, **args.model_kwargs)
    for flag in ("img_size", "patch_size"):
        if getattr(args, flag):
            kwargs[flag] = getattr(args, flag)
    try:
        model = build(**kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError, KeyError) as e:
        if not isinstance(plain := build(), VisionTransformer):
            raise PlanError(f"--model {args.model} is a {type(plain).__name__}: {SUPPORTED_MODELS}") from None
        raise PlanError(f"--model {args.model} with {kwargs}: {type(e).__name__}: {e}") from None
    if not isinstance(model, VisionTransformer):
        raise PlanError(f"--model {args.model} is a {type(model).__name__}: {SUPPORTED_MODELS}")
    kwargs["img_size"] = args.img_size or model.patch_embed.img_size[0]
    return kwargs, sum(p.numel() for p in model.parameters())


SUPPORTED_MODELS = ("the trainer supports timm's Vision Transformers (timm.models.vision_transformer.VisionTransformer "
                    "and its subclasses, e.g. vit_base_patch16_224, vit_small_patch16_384, deit_base_patch16_224; "
                    "timm.list_models('vit_*') lists them)")
