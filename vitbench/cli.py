"""train_vit.py's command line: the flags (typed, checked as they are parsed), the demo's defaults, and the process
edge that turns a UserError into one line and exit status 2. Nothing here decides anything: `plan()` hands the
flags to vitbench.plan.make_plan, and the trainer sees only the Plan.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import gc
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path

from vitbench import lifecycle, precision, vendor
from vitbench.data import demo
from vitbench.data.loaders import LOADERS
from vitbench.errors import EXIT_USER_ERROR, UserError, one_line, print_user_error
from vitbench.plan import Plan, make_plan
from vitbench.runinfo import MachineFacts, single_process_env

REPO = Path(__file__).resolve().parent.parent
# A Plan error is printed by each node's first rank; the others wait this long before exiting.
LEADER_GRACE_S = 3.0
DEFAULT_DATA_DIR = os.environ.get("VITBENCH_DATA_DIR", "/data/imagenet-wds")

# FlagPerf's recipe flags: any that a run changes is listed in its `fix_hp` column.
RECIPE_FLAGS = ["model", "img_size", "batch_size", "global_batch_size", "lr", "lr_base", "weight_decay", "epochs",
                "warmup_epochs", "smoothing", "mixup", "cutmix", "aa", "aug_repeats", "clip_grad"]

# --demo: a CPU-sized run of the same pipeline (flags given explicitly still win).
DEMO = dict(model="vit_tiny_patch16_224", img_size=64, patch_size=8, batch_size=32, global_batch_size=64,
            lr=1e-3, weight_decay=0.05, epochs=6, warmup_epochs=1, mixup=0.0, cutmix=0.0, smoothing=0.1,
            aug_repeats=1, eval_batch_size=100, workers=1, precision="fp32", log_interval=5,
            target_acc1=None, wandb="offline")


class Flags(argparse.Namespace):
    """The parsed flags, typed (a test checks every flag is listed here). Only make_plan reads them."""

    data_dir: str
    workers: int | None
    loader: str
    demo: bool
    model: str
    img_size: int | None
    patch_size: int | None
    model_kwargs: dict
    compile: bool
    batch_size: int
    global_batch_size: int
    lr: float | None
    lr_base: float
    lr_base_size: int
    weight_decay: float
    epochs: int
    warmup_epochs: float
    warmup_lr_factor: float
    min_lr: float
    smoothing: float
    mixup: float
    cutmix: float
    aa: str
    aug_repeats: int
    clip_grad: float
    target_acc1: float | None
    seed: int
    precision: str | None
    zero_stage: int | None
    deepspeed_config: str | None
    eval_batch_size: int
    eval_every: int
    max_steps: int | None
    nccl_busbw: float | None
    deepspeed_throughput_timer: bool
    output_dir: str | None
    run_name: str | None
    checkpoint_every: int
    keep_checkpoints: int
    resume: str
    log_interval: int
    timing_warmup_steps: int
    profile_steps: tuple[int, int] | None
    peak_tflops: float | None
    wandb: str
    wandb_project: str
    wandb_entity: str | None
    wandb_group: str | None
    vendor: str | None
    vendor_profile: object  # vitbench.vendor.VendorProfile, or None
    fix_hp: dict  # the vendor profile's overrides and the recipe flags this launch changed


# Flags other trainers (timm's train.py, accelerate, torchvision's references) have with another meaning here:
# refused naming ours, never taken for a prefix of one of ours.
FOREIGN_FLAGS = {
    "--warmup-lr": "timm's absolute warm-up lr; here the warm-up starts at --warmup-lr-factor x lr (default 0.033)",
    "--amp": "use --precision amp (or fp32, tf32, fp16, bf16)",
    "--apex-amp": "use --precision amp", "--native-amp": "use --precision amp",
    "--bf16": "use --precision bf16", "--fp16": "use --precision fp16 (fp16 weights) or amp (fp16 autocast)",
    "--mixed-precision": "use --precision", "--mixed_precision": "accelerate launch's; here --precision",
    "--grad-accum-steps": "accumulation is derived: --global-batch-size / (--batch-size x devices)",
    "--gradient-accumulation-steps": "accumulation is derived: --global-batch-size / (--batch-size x devices)",
    "--gradient_accumulation_steps": "accumulation is derived: --global-batch-size / (--batch-size x devices)",
    "--zero_stage": "accelerate launch's; here --zero-stage",
    "--sched": "the schedule is the recipe's: linear warm-up then cosine (--warmup-epochs, --min-lr)",
    "--lr-scheduler": "the schedule is the recipe's: linear warm-up then cosine (--warmup-epochs, --min-lr)",
    "--opt": "the optimizer is the recipe's AdamW (--lr, --weight-decay)",
    "--model-ema": "FlagPerf's recipe has no model EMA; this trainer has none",
    "--reprob": "FlagPerf's recipe has no random erasing; this trainer has none",
    "--color-jitter": "FlagPerf's recipe has no colour jitter; --aa chooses the augmentation",
    "--label-smoothing": "use --smoothing", "--clip": "use --clip-grad", "--epoch": "use --epochs",
    "--warmup-steps": "use --warmup-epochs", "--num-workers": "use --workers",
}


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        super().__init__(*a, allow_abbrev=False, **kw)  # no prefixes: `--warmup-lr` never means --warmup-lr-factor

    def error(self, message):  # one line, exit 2, as every other start-up error
        self.exit(EXIT_USER_ERROR, f"error: {message} (see --help)\n")

    def refuse_unknown(self, extras: list[str]) -> None:
        flags = [x.partition("=")[0] for x in extras if x.startswith("-")]
        for flag in flags:
            if flag in FOREIGN_FLAGS:
                self.error(f"{flag} is not a flag of train_vit.py: {FOREIGN_FLAGS[flag]}")
        ours = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        for flag in flags:
            close = difflib.get_close_matches(flag, ours, n=1)
            self.error(f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else ""))
        self.error(f"unexpected argument(s): {' '.join(extras)}")


class _Help(argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default (a help text that explains its default itself keeps its words)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        shown = "off" if action.default is False else "%(default)s"
        return f"{text} (default: {shown})".lstrip()


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


def optional(parse):
    """argparse type: PARSE's value, or None for 'none'."""
    return lambda text: None if text.strip().lower() == "none" else parse(text)


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


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog="train_vit.py", description=description, formatter_class=_Help,
                epilog="--demo sets " + ", ".join(f"--{k.replace('_', '-')} {'none' if v is None else v}"
                                                  for k, v in DEMO.items()) +
                f", --data-dir {demo.DEFAULT_DIR} (flags given explicitly still win)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="shards + _info.json (default: $VITBENCH_DATA_DIR or %(default)s)")
    g.add_argument("--workers", "-j", type=NONNEG, default=None,
                   help="data loader processes per device (default: usable CPUs / devices - 1, at most 16)")
    g.add_argument("--loader", choices=LOADERS, default="wds",
                   help="train loader: wds (shard reader + PIL/timm transforms in worker processes) or dali "
                        "(NVIDIA DALI: nvjpeg decode and augmentation on the GPU; CPU operators on a CPU)")
    g.add_argument("--demo", action="store_true",
                   help="build the demo shards if missing and run a CPU-sized demo (what it sets: below)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_base_patch16_224",
                   help="a timm Vision Transformer (vit_*, deit_*: timm.models.vision_transformer)")
    g.add_argument("--img-size", type=POS, default=None,
                   help="input size (default: the model's own, e.g. 224 for vit_base_patch16_224, 384 for *_384)")
    g.add_argument("--patch-size", type=POS, default=None, help="ViT patch size (default: the model's own)")
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
    g.add_argument("--lr-base-size", type=POS, default=4096, help="the global batch --lr-base is given for")
    g.add_argument("--weight-decay", type=NONNEG_FLOAT, default=0.3, help="AdamW weight decay, on every parameter")
    g.add_argument("--epochs", type=POS, default=300, help="the schedule's length (--max-steps stops earlier "
                   "without changing it)")
    g.add_argument("--warmup-epochs", type=NONNEG_FLOAT, default=30, help="linear warm-up, then cosine to --min-lr")
    g.add_argument("--warmup-lr-factor", type=NONNEG_FLOAT, default=0.033,
                   help="warm-up starts at this fraction of lr")
    g.add_argument("--min-lr", type=NONNEG_FLOAT, default=0.0, help="where the cosine ends")
    g.add_argument("--smoothing", type=at_least(0.0, float, below=1.0), default=0.11, help="label smoothing")
    g.add_argument("--mixup", type=NONNEG_FLOAT, default=0.2, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=NONNEG_FLOAT, default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--aa", default="ra",
                   help="augmentation: 'ra' = torchvision's RandAugment, 2 ops at magnitude 9 of 31 bins (FlagPerf's); "
                        "'ra-mM-nN' another strength; a timm policy ('rand-m9-mstd0.5', 'augmix-m5', 'original'); "
                        "'none'")
    g.add_argument("--aug-repeats", type=POS, default=3, help="repeated augmentation copies per decoded image")
    g.add_argument("--clip-grad", type=NONNEG_FLOAT, default=1.0, help="gradient norm clipping (0: off)")
    g.add_argument("--target-acc1", type=optional(at_least(0.0, float)), default=79.98,
                   help="stop once validation top-1 (%%) reaches this; 'none': train the whole schedule")
    g.add_argument("--seed", type=int, default=41, help="model init, augmentation and shard order")


def _add_system_flags(g) -> None:
    g.add_argument("--precision", choices=precision.PRECISIONS, default=None,
                   help="fp32 | tf32 | amp (fp16 autocast + loss scaling) | fp16 | bf16 (default: amp on one node; "
                        "bf16 across nodes where the device has it: no loss scaling)")
    g.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None,
                   help="override the ZeRO stage of the DeepSpeed config (default: the config's, or accelerate "
                        "launch's --zero_stage)")
    g.add_argument("--deepspeed-config", default=None,
                   help="DeepSpeed JSON (default: the launch config's, else ds_configs/zero1.json; a relative path is "
                        "looked up in the working directory, then in the repository)")
    g.add_argument("--eval-batch-size", type=POS, default=512, help="validation images per device and forward")
    g.add_argument("--eval-every", type=POS, default=1, help="evaluate every N epochs (and at the end)")
    g.add_argument("--max-steps", type=POS, default=None,
                   help="stop after N optimizer steps, the schedule unchanged (default: the schedule's end); the report "
                        "marks such a run as stopped before its recipe's end")
    g.add_argument("--nccl-busbw", type=POS_FLOAT, default=None, metavar="GB/S",
                   help="all_reduce bus bandwidth measured with nccl-tests across this run's nodes, recorded in "
                        "results.json beside the scaling figures (README: before the first 2x8 run; default: not "
                        "recorded)")
    g.add_argument("--vendor", default=None, metavar="NAME|PATH",
                   help="an accelerator vendor's profile (vendors/NAME/profile.toml): its hardware-bound overrides "
                        "(micro-batch, workers, loader, compile, communication) become the defaults and the run's "
                        "fix_hp; anything else is refused (README: Adding your accelerator; default: none)")
    g.add_argument("--deepspeed-throughput-timer", action="store_true",
                   help="also run DeepSpeed's ThroughputTimer (a second opinion on p_core; it synchronizes the "
                        "device every step: for benchmarks only)")


def _add_output_flags(g) -> None:
    g.add_argument("--output-dir", default=None, help="default: runs/<run-name>")
    g.add_argument("--run-name", default=None,
                   help="default: MODEL_NxK_PRECISION_zSTAGE_TIMESTAMP (names runs/<run-name> and the W&B run)")
    g.add_argument("--checkpoint-every", type=NONNEG, default=0,
                   help="optimizer steps between checkpoints (0: end only)")
    g.add_argument("--keep-checkpoints", type=POS, default=2, help="newest checkpoints kept; older ones are deleted")
    g.add_argument("--resume", default="",
                   help="'auto' (newest complete checkpoint in the output dir) or a path (default: a new run)")
    g.add_argument("--log-interval", type=POS, default=20, help="steps between profiler rows")
    g.add_argument("--timing-warmup-steps", type=NONNEG, default=10,
                   help="steps left out of the *_steady throughput figures")
    g.add_argument("--profile-steps", type=step_range, default=None, metavar="A:B",
                   help="torch.profiler trace of steps A..B (0 <= A < B; default: no trace)")
    g.add_argument("--peak-tflops", type=POS_FLOAT, default=None,
                   help="one device's dense peak for MFU (default: the datasheet table; none for unknown devices)")
    g.add_argument("--wandb", choices=["online", "offline", "off"], default="online",
                   help="online falls back to offline when there are no credentials")
    g.add_argument("--wandb-project", default="vitbench", help="W&B project")
    g.add_argument("--wandb-entity", default=None, help="W&B entity (default: your W&B default entity)")
    g.add_argument("--wandb-group", default=None, help="default: the run name")


def parse_args(argv=None, description: str | None = None) -> Flags:
    """DESCRIPTION: --help's text (train_vit.py's docstring)."""
    parser = build_parser(description)
    args, extras = parser.parse_known_args(argv, namespace=Flags())
    if extras:
        parser.refuse_unknown(extras)
    profile = None
    if args.vendor:
        try:
            profile = vendor.load(args.vendor)
        except UserError as e:
            parser.error(one_line(e))
        _check_overrides(parser, profile)
    if args.demo or profile:  # the demo's, then the profile's values become the defaults: what was typed wins
        parser.set_defaults(**{**(dict(DEMO, data_dir=str(demo.DEFAULT_DIR)) if args.demo else {}),
                               **(profile.overrides if profile else {})})
        args = parser.parse_args(argv, namespace=Flags())
    args.vendor_profile = profile
    recipe = build_parser()
    changed = {k: getattr(args, k) for k in RECIPE_FLAGS if getattr(args, k) != recipe.get_default(k)}
    # FlagPerf's fix_hp: what the profile set and the recipe flags changed, at the values that run
    args.fix_hp = {**{k: getattr(args, k) for k in (profile.overrides if profile else {})}, **changed}
    args.model_kwargs = dict(args.model_kwargs)
    return args


def _check_overrides(parser: argparse.ArgumentParser, profile) -> None:
    """A profile's values pass the same checks as the flags they stand for (type, range, choices)."""
    actions = {a.dest: a for a in parser._actions}
    for key, value in profile.overrides.items():
        action, where = actions[key], f"{profile.path}: overrides.{key} = {value!r}"
        if action.nargs == 0:  # a switch (--compile)
            if not isinstance(value, bool):
                parser.error(f"{where}: expected true or false")
            continue
        try:
            checked = action.type(str(value)) if action.type else value
        except argparse.ArgumentTypeError as e:
            parser.error(f"{where}: {e}")
        if action.choices and checked not in action.choices:
            parser.error(f"{where}: expected one of {', '.join(map(str, action.choices))}")
        profile.overrides[key] = checked


def plan(argv=None, description: str | None = None) -> Plan:
    """The Plan of this launch: flags parsed, the demo's shards built (--demo), every decision made and checked.
    Its errors are the same on every rank of a node (they read the same flags, data and checkpoints), so
    `run` prints them once per node."""
    flags = parse_args(argv, description)
    single_process_env()  # plain `python train_vit.py` is a one-process launch of the same path
    if flags.demo:
        demo.build_shared()
    try:
        return make_plan(flags, os.environ, MachineFacts.probe(), REPO)
    except UserError as e:
        e.same_on_every_local_rank = True
        raise


def run(main, argv=None) -> None:
    """The process edge around MAIN. A UserError (bad flag, data, config or checkpoint; a diverged loss) is one
    line and exit status 2. Errors leave through os._exit once main's own clean-up has run: interpreter teardown
    could hang on ranks still waiting in a collective (the launcher ends those when this one exits)."""
    lifecycle.exit_with_launcher()
    try:
        main(argv)
        # Teardown's garbage collection walks every object torch, DeepSpeed and the model made (~1.2 s of each
        # rank's exit here, after results.json is written); frozen, it skips them. Files are already closed.
        gc.freeze()
        return
    except UserError as e:
        if not getattr(e, "same_on_every_local_rank", False) or os.environ.get("LOCAL_RANK", "0") == "0":
            print_user_error(e)  # a Plan error: once per node
        else:  # the node's first rank says it; exiting first would have the launcher kill it before it can
            time.sleep(LEADER_GRACE_S)
        code = EXIT_USER_ERROR
    except SystemExit as e:  # 75: interrupted with a checkpoint
        code = e.code if isinstance(e.code, int) else 1
    except KeyboardInterrupt:  # Ctrl-C before the stop handler exists (start-up): nothing was trained yet
        print("interrupted during start-up; nothing was trained", file=sys.stderr)
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
