"""The seed's table, generated from `results.json` files instead of filled in by hand."""

from __future__ import annotations

import json
import re
from pathlib import Path

from vitbench import metrics as M
from vitbench.errors import UserError
from vitbench.files import loads

# The seed's columns, with their units (results.json's figures are in the same units: results.UNITS).
_FIGURES = ["e2e_time (s)", "p_whole (img/s)", "p_train (img/s)", "p_core (img/s)", "final_acc1 (%)",
            "mem (GiB used/total)"]
COLUMNS = {"zh": ["配置", "precision", "fix_hp", *_FIGURES], "en": ["config", "precision", "fix_hp", *_FIGURES]}
# W&B's table: the same columns as numbers (sortable, plottable); memory as two numbers.
WANDB_COLUMNS = [*COLUMNS["en"][:-1], "mem used (GiB)", "mem total (GiB)"]
_NODES_ZH = {1: "单机", 2: "两机"}


# What a row of the table needs from a results.json.
REQUIRED = ("nnodes", "nproc_per_node", "world_size", "precision")


class ResultsError(UserError):
    pass


def load_results(paths, problems: list[str] | None = None) -> list[dict]:
    """RUN_DIRs or results.json files, in the order given. A file that is not a run's results is an error naming
    it; with PROBLEMS (a list), that line is appended there instead and the others are still read."""
    out = []
    for p in map(Path, paths):
        try:
            out.append(_load_one(p))
        except ResultsError as e:
            if problems is None:
                raise
            problems.append(str(e))
    return out


def _load_one(p: Path) -> dict:
    f = p / "results.json" if p.is_dir() else p
    if not f.is_file():
        raise ResultsError(f"{f}: no results.json (did the run finish?)")
    try:
        r = loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ResultsError(f"{f}: not readable JSON ({e}); a run writes it whole at its end") from None
    missing = [k for k in REQUIRED if k not in r] if isinstance(r, dict) else list(REQUIRED)
    if missing:
        raise ResultsError(f"{f}: not a vitbench results.json (no {', '.join(missing)})")
    return r


def device_short_name(env: dict) -> str:
    if env.get("device_type") != "cuda":
        return env.get("device_type", "cpu").upper()
    name = env.get("device_name", "GPU")
    m = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", name.replace("NVIDIA ", ""))
    return m.group(1) if m else name.replace("NVIDIA ", "").split()[0]


def config_label(r: dict, lang: str = "zh") -> str:
    dev, n, k = device_short_name(r.get("environment", {})), r["nnodes"], r["nproc_per_node"]
    if lang == "zh":
        nodes = _NODES_ZH.get(n, f"{n}机")
        cards = "单卡" if k == 1 else f"{k}卡"
        return f"{dev}{nodes}{cards}({n}x{k})"
    return f"{dev} {n} node{'s' if n > 1 else ''} x {k} device{'s' if k > 1 else ''} ({n}x{k})"


def fix_hp_text(fix_hp: dict) -> str:
    short = {"batch_size": "bs", "global_batch_size": "gbs"}
    return ", ".join(f"{short.get(k, k)}={v}" for k, v in fix_hp.items()) or "/"


def num(value, digits: int = 0, unit: str = "") -> str:
    """A figure for a table or a console line; "/" (the seed's placeholder) when there is none."""
    return "/" if value is None else f"{value:.{digits}f}{unit}"


def sig(value, unit: str = "") -> str:
    """A figure with at least 3 significant digits (5.85, 0.123; 5109 stays whole); "/" when there is none."""
    if value is None:
        return "/"
    return f"{value:.0f}{unit}" if abs(value) >= 100 else f"{value:#.3g}".rstrip(".") + unit


def efficiency(rate: float | None, devices: int, base_rate: float | None, base_devices: int = 1) -> float | None:
    """Scaling efficiency: RATE on DEVICES against BASE_RATE on BASE_DEVICES scaled linearly (1.0 = linear)."""
    if not rate or not base_rate:
        return None
    return rate * base_devices / (devices * base_rate)


def partly_evaluated(r: dict) -> bool:
    """final_acc1 counted fewer validation samples than the split holds (unreadable ones were skipped)."""
    return r.get("final_acc1") is not None and r.get("eval_samples", 0) < r.get("val_num_samples", 0)


def stopped_early(r: dict) -> str | None:
    """Why a finished run ended before its recipe's end (--max-steps), or None: its final_acc1 is not the
    recipe's. A run that reached its target accuracy, or was interrupted (marked apart), is not this."""
    plan = r.get("plan") or {}
    recipe_steps = (plan.get("recipe") or {}).get("epochs", 0) * plan.get("steps_per_epoch", 0)
    if r.get("interrupted") or r.get("reached_target") or not recipe_steps:
        return None
    if r.get("global_step", recipe_steps) < recipe_steps:
        return (f"stopped by --max-steps at step {r['global_step']} of the recipe's {recipe_steps} "
                f"({plan['recipe']['epochs']} epochs): its figures are not a whole recipe's")
    return None


def zero_label(r: dict) -> str:
    """The ZeRO stage that ran, and the one asked for where the Plan ran another (one process runs ZeRO-0)."""
    ran, asked = r.get("zero_stage"), zero_stage(r)
    if ran is None:
        return ""
    return f" ZeRO-{ran}" + (f" (asked {asked})" if asked != ran else "")


def table_row(r: dict, lang: str = "zh") -> list:
    acc = num(r.get("final_acc1"), 3) + ("*" if partly_evaluated(r) else "")
    label = config_label(r, lang) + zero_label(r)
    if r.get("interrupted"):
        label += " †"
    elif stopped_early(r):
        label += " ‡"
    return [label, r["precision"], fix_hp_text(r.get("fix_hp", {})), sig(r.get("e2e_time")),
            sig(r.get("p_whole")), sig(r.get("p_train")), sig(r.get("p_core")), acc, r.get("mem") or "/"]


def numeric_row(r: dict) -> list:
    """table_row's figures as numbers (None where absent), for W&B's table (WANDB_COLUMNS)."""
    return [*table_row(r, "en")[:3],  # the label with its marks, precision, fix_hp
            *(r.get(k) for k in ("e2e_time", "p_whole", "p_train", "p_core", "final_acc1", "mem_used_gib",
                                 "mem_total_gib"))]


def zero_stage(r: dict):
    """The ZeRO stage a run asked for: at one process the Plan runs ZeRO-0 instead (the same update), and that
    run still compares with the other layouts of the stage it asked for (FlagPerf's 1x1 against 1x8)."""
    return r.get("zero_stage_requested", r.get("zero_stage"))


def describe(r: dict) -> dict:
    """What defines a run's work, field by field: runs are compared only where these match, but for what the
    comparison varies (the layout for scaling; precision and ZeRO stage for the precision x ZeRO matrix)."""
    plan = r.get("plan") or {}
    if "recipe" in plan:  # the Plan's decisions (results.json since the Plan records them)
        model_kwargs = dict(plan.get("model_kwargs") or {})
        work = {"model": plan.get("model"), "img_size": plan.get("img_size"),
                "patch_size": model_kwargs.get("patch_size"), "batch_size": plan["recipe"]["batch_size"],
                "compile": bool(plan["measurement"]["compile"])}
    else:  # older files: the flags
        cfg = r.get("config", {})
        model_kwargs = dict(cfg.get("model_kwargs") or {})
        work = {"model": cfg.get("model"), "img_size": cfg.get("img_size"), "patch_size": cfg.get("patch_size"),
                "batch_size": cfg.get("batch_size"), "compile": bool(cfg.get("compile"))}
    for owned in ("num_classes", "img_size", "patch_size"):  # set by flags, compared above
        model_kwargs.pop(owned, None)
    return {"device": device_short_name(r.get("environment", {})), "model": work["model"],
            "img_size": work["img_size"], "patch_size": work["patch_size"],
            "model_kwargs": json.dumps(model_kwargs, sort_keys=True), "batch_size": work["batch_size"],
            "global_batch_size": r.get("global_batch_size"), "loader": r.get("loader", "wds"),
            "compile": work["compile"], "precision": r.get("precision"), "zero_stage": zero_stage(r),
            "layout": f"{r['nnodes']}x{r['nproc_per_node']}"}


def _workload(r: dict) -> tuple:
    return tuple(v for k, v in describe(r).items() if k != "layout")


def scaling_efficiency(results: list[dict]) -> list[str]:
    """p_train per device against the 1x1 row of the same work (everything in `describe` but the layout),
    for rows on several devices that have one; that 1x1 row says "base". No baseline, no figure."""
    base = {}
    for i, r in enumerate(results):
        if r["world_size"] == 1 and r.get("p_train"):
            base.setdefault(_workload(r), (i, r["p_train"]))
    out, used = [], set()
    for r in results:
        i, rate = base.get(_workload(r), (None, None))
        e = efficiency(r.get("p_train"), r["world_size"], rate) if r["world_size"] > 1 else None
        out.append(num(100 * e if e is not None else None, 1, "%"))
        if e is not None:
            used.add(i)
    return ["base" if i in used else e for i, e in enumerate(out)]


def _mean(values) -> float | None:
    values = [v for v in values or [] if v is not None]
    return sum(values) / len(values) if values else None


def markdown_table(results: list[dict], lang: str = "zh", problems: list[str] = ()) -> str:
    """The seed's table; PROBLEMS: run folders left out (one line each), as footnotes."""
    cols = list(COLUMNS[lang])
    rows = [table_row(r, lang) for r in results]
    eff = scaling_efficiency(results)
    if any(e not in ("/", "base") for e in eff):
        cols.append("scaling" if lang == "en" else "扩展效率")
        rows = [row + [e] for row, e in zip(rows, eff)]
    if any(r.get("img_per_joule") for r in results):  # perf/W where a run measured its energy (vitbench.monitor)
        cols += ["img/J", "W/device"]
        rows = [row + [sig(r.get("img_per_joule")), sig(_mean(r.get("power_avg_w_per_device")))]
                for row, r in zip(rows, results)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    notes = [f"\\* {config_label(r, lang)} {r['precision']}: final_acc1 over {r['eval_samples']} of "
             f"{r['val_num_samples']} validation samples ({r['val_num_samples'] - r['eval_samples']} unreadable, "
             "skipped)" for r in results if partly_evaluated(r)]
    notes += [f"† {config_label(r, lang)} {r['precision']}: interrupted at step {r.get('global_step')} (a preemption "
              "or stop signal); its figures cover the steps so far, resume it with --resume auto"
              for r in results if r.get("interrupted")]
    notes += [f"‡ {config_label(r, lang)} {r['precision']}: {stopped_early(r)}" for r in results if stopped_early(r)]
    notes += [f"left out: {problem}" for problem in problems]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def plots(results: list[dict], out_dir: Path) -> list[Path]:
    """throughput.png (p_whole / p_train / p_core per config) and breakdown.png (milliseconds per optimizer
    step spent on compute, data wait, evaluation and the rest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [f"{config_label(r, 'en')}\n{r['precision']}" for r in results]
    xs = range(len(results))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(results)), 4))
    width = 0.27
    for i, key in enumerate(["p_whole", "p_train", "p_core"]):
        ax.bar([x + (i - 1) * width for x in xs], [r.get(key) or 0 for r in results], width, label=key)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("images / s")
    ax.set_title("Throughput per configuration")
    ax.legend()
    fig.tight_layout()
    paths = [out_dir / "throughput.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(results)), 4))
    bottom = [0.0] * len(results)
    windows = ("compute_time", "data_wait_time", "eval_time")
    seconds = {key: [r.get(key) or 0.0 for r in results] for key in windows}
    # The rest of the train window: checkpoint saves, logging, host overhead.
    seconds["other"] = [max(0.0, (r.get("train_time") or 0.0) - sum(r.get(k) or 0.0 for k in windows)) for r in results]
    names = {"compute_time": "compute", "data_wait_time": "data wait", "eval_time": "evaluation",
             "other": "other (checkpoints, logging)"}
    for key, name in names.items():
        vals = [1000 * t * r["global_batch_size"] / max(r.get("train_samples") or 1, 1)
                for t, r in zip(seconds[key], results)]
        ax.bar(list(xs), vals, 0.5, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("ms per optimizer step")
    ax.set_title("Where a step's time goes")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "breakdown.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


# W&B workspace: the standard panels, built with W&B's own wandb-workspaces library.
def _train(*names):
    return [f"{M.TRAIN_PREFIX}{n}" for n in names]


WORKSPACE_SECTIONS = {
    "Throughput": [("throughput", _train(M.THROUGHPUT)), ("throughput per device", _train(M.THROUGHPUT_PER_DEVICE))],
    "Where time goes": [("p_core vs p_train: compute vs step time", _train(M.COMPUTE_TIME, M.STEP_TIME)),
                        ("data-wait share", _train(M.DATA_WAIT_PCT))],
    "Efficiency": [("MFU", _train(M.MFU)), ("achieved TFLOP/s per device", _train(M.TFLOPS_PER_DEVICE))],
    "Memory": [("allocator peaks", _train(M.MEM_MAX_ALLOCATED, M.MEM_MAX_RESERVED)),
               ("allocator peaks, % of capacity", _train(M.MEM_MAX_ALLOCATED_PCT, M.MEM_MAX_RESERVED_PCT)),
               ("allocator retries and OOMs", _train(M.MEM_ALLOC_RETRIES, M.MEM_OOMS)),
               ("device used", _train(M.MEM_DEVICE_USED)), ("host RSS", _train(M.MEM_HOST_RSS))],
    "Training": [("loss", _train(M.LOSS)), ("learning rate", _train(M.LR)), ("gradient norm", _train(M.GRAD_NORM)),
                 ("loss scale", _train(M.LOSS_SCALE))],
    "Accuracy": [("top-1", [f"{M.EVAL_PREFIX}{M.ACC1}"]), ("top-5", [f"{M.EVAL_PREFIX}{M.ACC5}"]),
                 ("validation loss", [f"{M.EVAL_PREFIX}{M.VAL_LOSS}"])],
}
# Panels of series that only GPU runs (device memory, MFU without --peak-tflops) or fp16 (loss scale) log.
GPU_OR_FP16_ONLY = {*_train(M.MFU, M.MEM_MAX_ALLOCATED, M.MEM_MAX_RESERVED, M.MEM_MAX_ALLOCATED_PCT,
                            M.MEM_MAX_RESERVED_PCT, M.MEM_ALLOC_RETRIES, M.MEM_OOMS, M.MEM_DEVICE_USED, M.LOSS_SCALE)}


def build_workspace(entity_project: str, name: str = "vitbench"):
    """A `wandb_workspaces` Workspace object; `.save()` sends it (needs W&B credentials)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    entity, _, project = entity_project.partition("/")
    if not entity or not project:
        raise ResultsError(f"--wandb-workspace wants ENTITY/PROJECT, got '{entity_project}'")
    sections = []
    for title, panels in WORKSPACE_SECTIONS.items():
        x = f"{M.EVAL_PREFIX}epoch" if title == "Accuracy" else f"{M.TRAIN_PREFIX}step"
        sections.append(ws.Section(name=title, is_open=True, panels=[
            wr.LinePlot(title=t, x=x, y=list(ys), groupby="Group") for t, ys in panels]))
    summary = wr.RunComparer()
    sections.append(ws.Section(name="Run summary (six metrics)", is_open=True, panels=[summary]))
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections)
