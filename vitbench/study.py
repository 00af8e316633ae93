"""The study's deliverable from local run files: scaling, precision x ZeRO, each run's step timeline, and
`report.md` tying them to the seed's table and each run's environment (`report.py --out DIR`).

Runs are compared only when they differ in nothing but what a comparison varies: the layout for scaling,
precision and ZeRO stage for the matrix. Everything else that shapes the work (device, model, image size,
micro and global batch, loader, compile) must match; a run without a partner gets a footnote saying what
its nearest candidate differs in.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path

from vitbench import metrics as M
from vitbench.precision import PRECISIONS
from vitbench.reporting import config_label, describe, efficiency, markdown_table, num, plots, zero_stage
from vitbench.tracking import METRICS_FILE


def _groups(results: list[dict], varied: set[str]) -> tuple[list[list[dict]], list[str]]:
    """Runs grouped by everything but VARIED (groups of 2+ distinct VARIED values), and footnotes for the
    runs left out."""
    described = [(r, describe(r)) for r in results]
    fixed = [(r, {k: v for k, v in d.items() if k not in varied}, tuple(d[k] for k in sorted(varied)))
             for r, d in described]
    keyed = {}
    for r, rest, kind in fixed:
        keyed.setdefault(tuple(rest.values()), []).append((r, rest, kind))
    what = " / ".join(sorted(varied))
    groups, notes = [], []
    for members in keyed.values():
        if len({kind for _, _, kind in members}) > 1:
            groups.append([r for r, _, _ in members])
            continue
        for r, rest, kind in members:
            others = [o_rest for _, o_rest, o_kind in fixed if o_kind != kind]
            if not others:
                notes.append(f"{run_label(r)}: no run of another {what} to compare with")
                continue
            diffs = min(([k for k, v in o_rest.items() if v != rest[k]] for o_rest in others), key=len)
            notes.append(f"{run_label(r)}: not compared; the nearest run of another {what} also differs in "
                         f"{', '.join(diffs)}")
    return groups, notes


def run_label(r: dict) -> str:
    return f"{config_label(r, 'en')} {r['precision']} ZeRO-{zero_stage(r)}"


def _pct(value: float | None) -> str:
    return num(None if value is None else 100 * value, 1, "%")


# ---- scaling -------------------------------------------------------------------------------------------
def scaling_rows(group: list[dict]) -> list[dict]:
    """Per layout: devices, p_train, p_core, per-device efficiency against 1x1 and multi-node efficiency
    against one node with as many devices per node (FlagPerf's 2x8 vs 1x8), for p_train and p_core."""
    rows = []
    one = next((r for r in group if r["world_size"] == 1), None)
    for r in sorted(group, key=lambda r: (r["world_size"], r["nnodes"])):
        row = {"run": r, "devices": r["world_size"], "p_train": r.get("p_train"), "p_core": r.get("p_core")}
        single = next((s for s in group if s["nnodes"] == 1 and s["nproc_per_node"] == r["nproc_per_node"]), None)
        for key in ("p_train", "p_core"):
            row[f"{key}_vs_1x1"] = efficiency(r.get(key), r["world_size"], one.get(key)) if one else None
            row[f"{key}_vs_1node"] = efficiency(r.get(key), r["nnodes"], single.get(key)) \
                if single and r["nnodes"] > 1 else None
        rows.append(row)
    return rows


def scaling_markdown(group: list[dict]) -> str:
    lines = ["| layout | devices | p_train | p_core | p_train per device vs 1x1 | p_core per device vs 1x1 "
             "| p_train vs one node | p_core vs one node |", "|" + " --- |" * 8]
    for row in scaling_rows(group):
        r = row["run"]
        lines.append(f"| {r['nnodes']}x{r['nproc_per_node']} | {row['devices']} | {num(row['p_train'], 1)} | "
                     f"{num(row['p_core'], 1)} | {_pct(row['p_train_vs_1x1'])} | {_pct(row['p_core_vs_1x1'])} | "
                     f"{_pct(row['p_train_vs_1node'])} | {_pct(row['p_core_vs_1node'])} |")
    return "\n".join(lines) + "\n"


def scaling_plot(group: list[dict], path: Path) -> Path:
    plt = _pyplot()
    rows = scaling_rows(group)
    devices = [row["devices"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, marker in (("p_core", "o"), ("p_train", "s")):
        ax.plot(devices, [row[key] or math.nan for row in rows], marker=marker, label=key)
    base = rows[0]
    if base["p_core"]:  # ideal: the smallest layout's per-device p_core times the devices
        ax.plot(devices, [base["p_core"] / base["devices"] * d for d in devices], "k--", lw=1,
                label=f"ideal (linear from {base['devices']} device{'s' if base['devices'] > 1 else ''})")
    ax.set_xlabel("devices")
    ax.set_ylabel("images / s")
    ax.set_xticks(devices)
    ax.set_title(textwrap.fill(f"Scaling: {_group_title(group, {'layout'})}", 80), fontsize=8)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


# ---- precision x ZeRO ------------------------------------------------------------------------------------
MATRIX_METRICS = [("p_core", "p_core (img/s)", 1), ("p_train", "p_train (img/s)", 1), ("mfu_core(%)", "MFU (%)", 1),
                  ("peak_memory", "peak memory (GiB)", 2)]


def peak_memory(r: dict) -> float | None:
    """The allocator's peak on GPUs; on CPUs the largest rank's peak RSS (the only memory there is)."""
    return r.get("mem_max_allocated_gib", r.get("mem_used_gib"))


def matrix_cells(group: list[dict]) -> tuple[list[str], list[int], dict]:
    precisions = [p for p in PRECISIONS if any(r["precision"] == p for r in group)]
    stages = sorted({zero_stage(r) for r in group})
    cells = {(r["precision"], zero_stage(r)): {**{k: r.get(k) for k, _, _ in MATRIX_METRICS},
                                                 "peak_memory": peak_memory(r)} for r in group}
    return precisions, stages, cells


def _shown_metrics(cells: dict) -> list[tuple]:
    """The matrix metrics some run has (MFU needs a known peak: none on CPUs without --peak-tflops)."""
    return [m for m in MATRIX_METRICS if any(c.get(m[0]) is not None for c in cells.values())]


def matrix_markdown(group: list[dict]) -> str:
    precisions, stages, cells = matrix_cells(group)
    out = []
    for key, title, digits in _shown_metrics(cells):
        lines = [f"| {title} | " + " | ".join(f"ZeRO-{s}" for s in stages) + " |", "|" + " --- |" * (len(stages) + 1)]
        for p in precisions:
            lines.append(f"| {p} | " + " | ".join(num(cells.get((p, s), {}).get(key), digits) for s in stages) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def matrix_plot(group: list[dict], path: Path) -> Path:
    plt = _pyplot()
    precisions, stages, cells = matrix_cells(group)
    shown = _shown_metrics(cells)
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 1.4 + 0.6 * len(precisions)), squeeze=False)
    for ax, (key, title, digits) in zip(axes[0], shown):
        grid = [[cells.get((p, s), {}).get(key) for s in stages] for p in precisions]
        values = [[math.nan if v is None else v for v in row] for row in grid]
        ax.imshow(values, cmap="viridis_r" if key == "peak_memory" else "viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, num(v, digits), ha="center", va="center", fontsize=8, color="white",
                        bbox={"facecolor": "black", "alpha": 0.35, "lw": 0, "pad": 1})
        ax.set_xticks(range(len(stages)), [f"ZeRO-{s}" for s in stages], fontsize=8)
        ax.set_yticks(range(len(precisions)), precisions, fontsize=8)
        ax.set_title(f"{title}, {'lower' if key == 'peak_memory' else 'higher'} is brighter", fontsize=8)
    fig.suptitle(textwrap.fill(f"Precision x ZeRO: {_group_title(group, {'precision', 'zero_stage'})}", 120),
                 fontsize=8)
    return _save(fig, path)


# ---- stragglers ------------------------------------------------------------------------------------------
def straggler_markdown(results: list[dict]) -> str:
    """Compute and data wait per optimizer step on the slowest and the fastest rank of each multi-rank run:
    every rank waits for the slowest at each gradient reduction, so the gap is throughput lost to it."""
    lines = ["| run | compute / step, slowest rank (ms) | fastest rank (ms) | gap | data wait / step, slowest "
             "rank (ms) | fastest rank (ms) |", "|" + " --- |" * 6]
    for r in results:
        if r.get("world_size", 1) < 2 or r.get("compute_time_fastest_rank") is None:
            continue
        steps = max(1, (r.get("train_samples") or 0) // max(r["global_batch_size"], 1))
        slow, fast = r["compute_time"], r["compute_time_fastest_rank"]
        gap = (slow - fast) / slow if slow else None
        lines.append(f"| {run_label(r)} | {num(1000 * slow / steps, 1)} | {num(1000 * fast / steps, 1)} | "
                     f"{_pct(gap)} | {num(1000 * r['data_wait_time'] / steps, 1)} | "
                     f"{num(1000 * r['data_wait_time_fastest_rank'] / steps, 1)} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else "No multi-rank run records per-rank times.\n"


# ---- step timeline ---------------------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def timeline_plot(r: dict, rows: list[dict], path: Path) -> Path:
    """Throughput, data-wait share and memory against the step, evaluations and checkpoints marked."""
    plt = _pyplot()
    train = [row for row in rows if row["kind"] == "train"]
    steps = [row[M.STEP] for row in train]
    mem_key = M.MEM_MAX_RESERVED if any(M.MEM_MAX_RESERVED in row for row in train) else M.MEM_HOST_RSS
    panels = [(M.THROUGHPUT, "throughput (img/s)"), (M.DATA_WAIT_PCT, "data wait (% of step)"),
              (mem_key, "allocator peak, reserved (GiB)" if mem_key == M.MEM_MAX_RESERVED else "host RSS (GiB)")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 6), sharex=True)
    for ax, (key, label) in zip(axes, panels):
        ax.plot(steps, [row.get(key, math.nan) for row in train], marker=".", lw=1)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        for row in rows:
            if row["kind"] == "eval":
                ax.axvline(row[M.STEP], color="tab:green", ls="--", lw=1)
            elif row["kind"] == "checkpoint":
                ax.axvline(row[M.STEP], color="tab:gray", ls=":", lw=1)
    axes[0].set_title(f"{r['run_name']}: per-step timeline\n(green dashed: evaluation, grey dotted: checkpoint)",
                      fontsize=8)
    axes[-1].set_xlabel("optimizer step")
    from matplotlib.ticker import MaxNLocator

    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


def spread_markdown(results: list[dict]) -> str:
    """Per run and steady figure: the mean, the median and p5-p95 of the per-step rate, and the 95% interval of the
    mean (a block bootstrap of the run's own steps: vitbench.stats)."""
    lines = ["| run | figure | mean | median | p5 - p95 | 95% interval of the mean | steps |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for figure, s in (r.get("spread") or {}).items():
            if s:
                lines.append(f"| {run_label(r)} | {figure} | {num(s['mean'], 1)} | {num(s['median'], 1)} | "
                             f"{num(s['p5'], 1)} - {num(s['p95'], 1)} | {num(s['ci95'][0], 1)} - "
                             f"{num(s['ci95'][1], 1)} | {s['steps']} |")
    return "\n".join(lines) if len(lines) > 2 else "No run recorded its step times (older results.json files)."


def parity_markdown(results: list[dict], run_dirs: list[Path]) -> str:
    """Each run against the fp32 run of the same work, layout and ZeRO stage (the reference precision): does a
    16-bit precision still train like fp32 (vitbench.compare.parity: loss and top-1)?"""
    from vitbench.compare import Side, parity

    keyed = [(dict(describe(r)), r, d) for r, d in zip(results, run_dirs)]
    lines = ["| run | against | loss mean relative error | top-1 at common evaluations | verdict |",
             "| --- | --- | --- | --- | --- |"]
    for key, r, d in keyed:
        if key["precision"] == "fp32":
            continue
        ref = next(((rr, dd) for kk, rr, dd in keyed if kk["precision"] == "fp32" and
                    {**kk, "precision": None} == {**key, "precision": None}), None)
        if ref is None:
            continue
        p = parity(Side([ref[0]], [ref[1]]), Side([r], [d]))
        if p["verdict"] == "not compared":
            lines.append(f"| {run_label(r)} | {run_label(ref[0])} | / | / | not compared ({p['note']}) |")
            continue
        evals = ", ".join(f"{e['candidate']:.1f} vs {e['base']:.1f}" for e in p["evals"]) or "/"
        lines.append(f"| {run_label(r)} | {run_label(ref[0])} | {100 * p['loss_mean_relative_error']:.2f}% "
                     f"(threshold {100 * p['threshold']:.0f}%) | {evals} | {p['verdict']} |")
    if len(lines) == 2:
        return "No 16-bit run has an fp32 run of the same work, layout and ZeRO stage to compare with."
    return "\n".join(lines)


# ---- report.md --------------------------------------------------------------------------------------------
def write_report(results: list[dict], run_dirs: list[Path], out: Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = ["# vitbench report", "",
             f"{len(results)} run(s): {', '.join(r['run_name'] for r in results)}.", "",
             "## The six figures", "", markdown_table(results, "en"), ""]
    for path in plots(results, out):
        parts += [f"![{path.stem}]({path.name})", ""]
    parts += ["## Scaling", ""]
    groups, notes = _groups(results, {"layout"})
    for i, group in enumerate(groups, 1):
        name = "scaling.png" if len(groups) == 1 else f"scaling_{i}.png"
        parts += [f"**{_group_title(group, {'layout'})}**", "", scaling_markdown(group),
                  f"![scaling]({scaling_plot(group, out / name).name})", ""]
    parts += _notes(notes, "No runs of one configuration on several layouts." if not groups else None)
    parts += ["## Precision x ZeRO", ""]
    groups, notes = _groups(results, {"precision", "zero_stage"})
    for i, group in enumerate(groups, 1):
        name = "matrix.png" if len(groups) == 1 else f"matrix_{i}.png"
        parts += [f"**{_group_title(group, {'precision', 'zero_stage'})}**", "", matrix_markdown(group),
                  "Peak memory: the allocator's peak on GPUs, the largest rank's peak RSS on CPUs. MFU is shown "
                  "where the device's peak is known (GPUs in the peak table, or `--peak-tflops`).", "",
                  f"![precision x ZeRO]({matrix_plot(group, out / name).name})", ""]
    parts += _notes(notes, "No runs that differ only in precision or ZeRO stage." if not groups else None)
    parts += ["## Spread of the steady figures", "", spread_markdown(results), ""]
    parts += ["## Convergence parity against fp32", "", parity_markdown(results, run_dirs), ""]
    parts += ["## Stragglers", "", straggler_markdown(results), ""]
    parts += ["## Step timelines", ""]
    for r, run_dir in zip(results, run_dirs):
        rows = read_metrics(run_dir)
        if not any(row["kind"] == "train" for row in rows):
            parts += [f"- {r['run_name']}: no {METRICS_FILE} rows in {run_dir}", ""]
            continue
        png = timeline_plot(r, rows, out / f"steps_{_safe(r['run_name'])}.png")
        parts += [f"![steps of {r['run_name']}]({png.name})", ""]
    parts += ["## Environment", "", "| run | device | driver | torch | DeepSpeed | commit |", "|" + " --- |" * 6]
    for r in results:
        env = r.get("environment", {})
        parts.append(f"| {r['run_name']} | {env.get('device_name', '/')} | {env.get('driver') or '/'} | "
                     f"{env.get('torch', '/')} | {env.get('deepspeed', '/')} | {env.get('git_commit') or '/'} |")
    path = out / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def _notes(notes: list[str], empty: str | None) -> list[str]:
    lines = [empty, ""] if empty else []
    return lines + ([f"- {n}" for n in notes] + [""] if notes else [])


def _group_title(group: list[dict], varied: set[str]) -> str:
    d = describe(group[0])
    shown = {k: v for k, v in d.items() if k not in varied and k not in ("model_kwargs", "compile")}
    return ", ".join(f"{k} {v}" for k, v in shown.items() if v is not None)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return Path(path)
