"""`report.py compare BASE CANDIDATE...`: what differs between runs, whether a candidate is faster beyond noise,
and whether it still trains like the base.

- Repeats: runs whose Plans are equal but for run name, seed and output folder are one configuration; they are
  pooled (the base's repeats: `--base-repeat`), and the between-run spread widens the interval
  (vitbench.stats). With fewer than 3 runs on a side the launch-to-launch spread is the stated floor
  (`--launch-noise`, default 15%: what keeps identical launches on these CPU machines within noise, BENCHMARKS.md).
- Figures: p_core / p_train / p_whole steady (ratio candidate / base, 95% interval from the runs' step times,
  `faster`, `slower` or `within noise`), MFU (the p_core interval, scaled), peak memory and energy per image
  (`less`, `more` or `within noise`, by a stated tolerance: no interval exists for one number per run), final
  top-1 (points, margin from the validation set's size: 1.96 x the standard error of the difference), e2e_time.
- Parity (FlagPerf's rule for a vendor's run): the training loss at the steps both logged after the warm-up,
  mean relative error <= 2% (`--parity-threshold`), and top-1 at each common evaluation within its margin:
  `trains like the base` or `differs`, with the figures.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitbench import stats
from vitbench.files import loads
from vitbench.reporting import ResultsError, load_results

STEADY = ("p_core_steady", "p_train_steady", "p_whole_steady")
# Relative tolerances where a figure is one number per run (no step times to take an interval from).
MEMORY_TOLERANCE, ENERGY_TOLERANCE = 0.02, 0.05
PARITY_THRESHOLD = 0.02  # FlagPerf: mean relative error of the loss below 2%
# Fields that differ between repeats of one configuration, and so never make two runs different.
VOLATILE = {"run_name", "output_dir", "resume_from", "warnings", "recipe.seed"}
# What identifies one launch, not a configuration: a repeat on another host, port or job is still a repeat.
VOLATILE_ENVIRONMENT = {"hostname", "launch.MASTER_PORT", "launch.TORCHELASTIC_RUN_ID", "launch.SLURM_JOB_ID"}
# What a reader wants to see first when two runs differ: the work itself, then how it ran, then where.
PRIORITY = ("plan.model", "plan.model_kwargs", "plan.img_size", "plan.n_params", "plan.precision", "plan.zero_stage",
            "plan.loader", "plan.recipe", "plan.world_size", "plan.nnodes", "plan.nproc_per_node", "plan.vendor",
            "plan.deepspeed_config", "plan.measurement", "plan.data", "environment.device", "environment.torch",
            "environment.deepspeed", "environment")


@dataclass
class Side:
    """One configuration: its runs (results.json dicts) and their folders (for metrics.jsonl)."""

    runs: list[dict]
    dirs: list[Path | None] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # the paths' names, where a run has no run_name

    @property
    def name(self) -> str:
        names = [r.get("run_name") or label for r, label in zip(self.runs, self.labels or ["?"] * len(self.runs))]
        return names[0] + (f" (+{len(names) - 1} repeats)" if len(names) > 1 else "")


def flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def configuration(r: dict) -> dict:
    """The Plan without what differs between repeats."""
    return {k: v for k, v in flatten(r.get("plan") or {}).items() if k not in VOLATILE}


def repeats(a: dict, b: dict) -> bool:
    return bool(a.get("plan")) and configuration(a) == configuration(b)


def differences(base: dict, cand: dict) -> list[tuple[str, object, object]]:
    """Every field of the Plan (vendor profile and data identity included) and of the environment that is not
    equal, most telling first."""
    fields = {}
    if not base.get("plan") or not cand.get("plan"):  # written before results.json held the Plan: its own fields
        for key in ("nnodes", "nproc_per_node", "world_size", "precision", "zero_stage", "global_batch_size", "loader",
                    "fix_hp"):
            if base.get(key) != cand.get(key):
                fields[f"results.{key}"] = (base.get(key), cand.get(key))
    for section in ("plan", "environment"):
        a = {f"{section}.{k}": v for k, v in flatten(base.get(section)).items()}
        b = {f"{section}.{k}": v for k, v in flatten(cand.get(section)).items()}
        for key in sorted(set(a) | set(b)):
            if key.split(".", 1)[1] in VOLATILE or key.split(".", 1)[1] in VOLATILE_ENVIRONMENT:
                continue
            if a.get(key) != b.get(key):
                fields[key] = (a.get(key), b.get(key))

    def rank(key):
        return next((i for i, p in enumerate(PRIORITY) if key == p or key.startswith(p + ".") or
                     key.startswith(p + "_")), len(PRIORITY)), key
    return [(k, *fields[k]) for k in sorted(fields, key=rank)]


# ---- figures --------------------------------------------------------------------------------------------------
def _step_series(r: dict, figure: str) -> tuple[np.ndarray, float, float] | None:
    """(per-step seconds, samples per step, fixed seconds per step) of FIGURE from a run's step times."""
    t = r.get("step_times")
    if not t:
        return None
    key = "compute_s" if figure == "p_core_steady" else "train_s"
    extra = t.get("paused_per_step_s", 0.0) if figure == "p_whole_steady" else 0.0
    return np.asarray(t[key], float), float(t["samples_per_step"]), extra


def throughput_ratio(base: Side, cand: Side, figure: str, launch_noise: float, seed: int = 0) -> dict:
    """FIGURE's ratio candidate / base with its 95% interval and verdict."""
    values = [[r.get(figure) for r in side.runs] for side in (base, cand)]
    whole = figure.removesuffix("_steady")
    if not all(v is not None for side in values for v in side):  # an older results.json: its whole-run figure
        values = [[r.get(figure) or r.get(whole) for r in side.runs] for side in (base, cand)]
        if not all(v is not None for side in values for v in side):
            return {"figure": figure, "verdict": "not measured"}
    point = float(np.mean(values[1]) / np.mean(values[0]))
    series = [[_step_series(r, figure) for r in side.runs] for side in (base, cand)]
    out = {"figure": figure, "base": float(np.mean(values[0])), "candidate": float(np.mean(values[1])),
           "ratio": point}
    if any(s is None for side in series for s in side):
        out.update(interval=None, verdict=_verdict_by_tolerance(point, launch_noise, "faster", "slower"),
                   note="no step times in a results.json (written before vitbench recorded them): verdict by "
                        f"the launch-noise tolerance of {100 * launch_noise:.0f}%, no interval")
        return out
    rng = np.random.default_rng(seed)
    draws = [stats.rate_resamples([s[0] for s in side], side[0][1], rng, launch_noise=launch_noise,
                                  extra_per_step=[s[2] for s in side]) for side in series]
    lo, hi = stats.interval(draws[1] / draws[0])
    out.update(interval=[lo, hi], verdict="faster" if lo > 1 else "slower" if hi < 1 else "within noise")
    return out


def _verdict_by_tolerance(ratio: float, tolerance: float, up: str, down: str) -> str:
    return up if ratio > 1 + tolerance else down if ratio < 1 - tolerance else "within noise"


def scalar_ratio(base: Side, cand: Side, key: str, tolerance: float, up="more", down="less", per_image=False) -> dict:
    def value(r):
        v = r.get(key)
        return v / r["train_samples"] if v is not None and per_image and r.get("train_samples") else v
    a, b = [value(r) for r in base.runs], [value(r) for r in cand.runs]
    name = f"{key} per image" if per_image else key
    if any(v is None for v in a + b):
        return {"figure": name, "verdict": "not measured"}
    ratio = float(np.mean(b) / np.mean(a)) if np.mean(a) else math.nan
    return {"figure": name, "base": float(np.mean(a)), "candidate": float(np.mean(b)), "ratio": ratio,
            "interval": None, "tolerance": tolerance, "verdict": _verdict_by_tolerance(ratio, tolerance, up, down)}


def accuracy_margin(p1: float, n1: int, p2: float, n2: int) -> float:
    """95% margin (points) of a top-1 difference from the two validation sets' sizes."""
    a, b = p1 / 100, p2 / 100
    return 100 * 1.96 * math.sqrt(max(a * (1 - a), 1e-4) / max(n1, 1) + max(b * (1 - b), 1e-4) / max(n2, 1))


def accuracy(base: Side, cand: Side) -> dict:
    a, b = [r.get("final_acc1") for r in base.runs], [r.get("final_acc1") for r in cand.runs]
    if any(v is None for v in a + b):
        return {"figure": "final_acc1", "verdict": "not measured"}
    pa, pb = float(np.mean(a)), float(np.mean(b))
    margin = accuracy_margin(pa, base.runs[0].get("eval_samples", 0), pb, cand.runs[0].get("eval_samples", 0))
    diff = pb - pa
    return {"figure": "final_acc1", "base": pa, "candidate": pb, "difference": diff, "margin": margin,
            "verdict": "higher" if diff > margin else "lower" if diff < -margin else "within noise"}


def figures(base: Side, cand: Side, launch_noise: float) -> list[dict]:
    out = [throughput_ratio(base, cand, f, launch_noise) for f in STEADY]
    core = out[0]
    mfu_b, mfu_c = [r.get("mfu_core_steady(%)") for r in base.runs], [r.get("mfu_core_steady(%)") for r in cand.runs]
    if core.get("ratio") and None not in mfu_b + mfu_c:  # MFU = p_core x FLOPs / peak: p_core's interval, scaled
        scale = (np.mean(mfu_c) / np.mean(mfu_b)) / core["ratio"]
        interval = [x * scale for x in core["interval"]] if core.get("interval") else None
        out.append({"figure": "mfu_core_steady(%)", "base": float(np.mean(mfu_b)), "candidate": float(np.mean(mfu_c)),
                    "ratio": float(np.mean(mfu_c) / np.mean(mfu_b)), "interval": interval,
                    "verdict": core["verdict"] if interval else _verdict_by_tolerance(
                        float(np.mean(mfu_c) / np.mean(mfu_b)), launch_noise, "higher", "lower")})
    else:
        out.append({"figure": "mfu_core_steady(%)", "verdict": "not measured"})
    out.append(scalar_ratio(base, cand, "mem_used_gib", MEMORY_TOLERANCE))
    out.append(scalar_ratio(base, cand, "energy_j", ENERGY_TOLERANCE, per_image=True))
    out.append(accuracy(base, cand))
    e2e = scalar_ratio(base, cand, "e2e_time", launch_noise, up="slower", down="faster")
    out.append(e2e)
    return out


# ---- parity ---------------------------------------------------------------------------------------------------
def losses(run_dir: Path | None) -> dict[int, float]:
    """{step: training loss} from a run's metrics.jsonl train rows."""
    path = run_dir / "metrics.jsonl" if run_dir else None
    if not path or not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            row = loads(line)
        except ValueError:
            continue  # a row cut by a full disk
        if isinstance(row, dict) and row.get("kind") == "train" and row.get("loss") is not None:
            out[int(row["step"])] = float(row["loss"])
    return out


def _mre(a: dict[int, float], b: dict[int, float], steps) -> float:
    return float(np.mean([abs(b[s] - a[s]) / max(abs(a[s]), 1e-12) for s in steps]))


def parity(base: Side, cand: Side, threshold: float = PARITY_THRESHOLD) -> dict:
    """Does the candidate train like the base? The training loss at common logged steps after the warm-up (mean
    relative error to the base's mean curve) within THRESHOLD, and top-1 at each common evaluation within the
    validation set's margin. Where the base has repeats, both bounds widen to what its own repeats differ by (a
    short run's seed-to-seed noise can exceed FlagPerf's 2%): a candidate as close as a repeat trains alike."""
    curves = [losses(d) for d in base.dirs]
    cand_curves = [losses(d) for d in cand.dirs]
    warmup = ((base.runs[0].get("plan") or {}).get("recipe") or {}).get("warmup_steps", 0)
    if not all(curves) or not all(cand_curves):
        return {"verdict": "not compared", "note": "no training-loss rows (metrics.jsonl missing)"}
    steps = sorted(s for s in set.intersection(*map(set, curves + cand_curves)) if s > warmup)
    if not steps:
        return {"verdict": "not compared", "note": "no training-loss steps in common after the warm-up "
                                                   "(too short a run)"}
    mean = {s: float(np.mean([c[s] for c in curves])) for s in steps}
    cand_mean = {s: float(np.mean([c[s] for c in cand_curves])) for s in steps}
    mre = _mre(mean, cand_mean, steps)
    repeat_mre = max((_mre(a, b, steps) for i, a in enumerate(curves) for b in curves[i + 1:]), default=0.0)
    bound = max(threshold, repeat_mre)
    by_step = [{e["step"]: e for e in r.get("evals", [])} for r in base.runs]
    evals = []
    for e in cand.runs[0].get("evals", []):
        if all(e["step"] in b for b in by_step):
            accs = [b[e["step"]]["acc1"] for b in by_step]
            base_acc, n = float(np.mean(accs)), by_step[0][e["step"]]["samples"]
            margin = max(accuracy_margin(base_acc, n, e["acc1"], e["samples"]), max(accs) - min(accs))
            evals.append({"step": e["step"], "base": base_acc, "candidate": e["acc1"], "margin": margin,
                          "within": abs(e["acc1"] - base_acc) <= margin})
    same = mre <= bound and all(e["within"] for e in evals)
    return {"verdict": "trains like the base" if same else "differs", "loss_mean_relative_error": mre,
            "threshold": bound, "repeats_mean_relative_error": repeat_mre if len(curves) > 1 else None,
            "steps_compared": len(steps), "after_warmup_step": warmup, "evals": evals}


# ---- the command ----------------------------------------------------------------------------------------------
def sides(base: list[str], candidates: list[str]) -> tuple[Side, list[Side]]:
    """BASE (a run and its repeats) and the candidates, repeats among them pooled."""
    def side(paths):
        paths = [Path(p) for p in paths]
        dirs = [p if p.is_dir() else p.parent for p in paths]
        labels = [p.stem if p.suffix == ".json" and p.name != "results.json" else d.name for p, d in zip(paths, dirs)]
        return Side(load_results(paths), dirs, labels)
    b = side(base)
    for r in b.runs[1:]:
        if not repeats(b.runs[0], r):
            raise ResultsError(f"--base-repeat {r.get('run_name')}: not a repeat of {b.runs[0].get('run_name')} "
                               f"(its Plan differs: {differences(b.runs[0], r)[0][0]})")
    groups: list[Side] = []
    for path in candidates:
        one = side([path])
        home = next((g for g in groups if repeats(g.runs[0], one.runs[0])), None)
        if home:
            home.runs += one.runs
            home.dirs += one.dirs
            home.labels += one.labels
        else:
            groups.append(one)
    return b, groups


def compare(base: Side, cand: Side, launch_noise: float = stats.DEFAULT_LAUNCH_NOISE,
            parity_threshold: float = PARITY_THRESHOLD) -> dict:
    figs = figures(base, cand, launch_noise)
    pooled = {}
    for name, side in (("base", base), ("candidate", cand)):
        rates = [r.get("p_core_steady") for r in side.runs if r.get("p_core_steady")]
        pooled[name] = {"runs": len(side.runs), "p_core_steady_median": float(np.median(rates)) if rates else None,
                        "p_core_steady_min": min(rates, default=None), "p_core_steady_max": max(rates, default=None),
                        "p_core_steady_olympic_mean": stats.olympic_mean(rates)}
    return {"base": base.name, "candidate": cand.name, "differences": [
        {"field": k, "base": a, "candidate": b} for k, a, b in differences(base.runs[0], cand.runs[0])],
        "figures": figs, "repeats": pooled, "parity": parity(base, cand, parity_threshold),
        "launch_noise": launch_noise}


def slower_beyond(result: dict, pct: float) -> list[str]:
    """The steady p_core / p_train figures slower than the base by more than PCT% beyond noise."""
    bad = []
    for f in result["figures"]:
        if f["figure"] in ("p_core_steady", "p_train_steady") and f.get("ratio"):
            upper = f["interval"][1] if f.get("interval") else f["ratio"]
            if upper < 1 - pct / 100:
                bad.append(f"{f['figure']} {f['ratio']:.3f}x (95% up to {upper:.3f}x)")
    return bad


def _fmt(v) -> str:
    if v is None:
        return "/"
    if isinstance(v, float):
        return f"{v:.4g}"
    text = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return text if len(text) <= 60 else text[:57] + "..."


def markdown(result: dict) -> str:
    lines = [f"## {result['candidate']} vs {result['base']}", "", "What differs:", ""]
    diffs = result["differences"]
    if diffs:
        lines += ["| field | base | candidate |", "| --- | --- | --- |"]
        lines += [f"| {d['field']} | {_fmt(d['base'])} | {_fmt(d['candidate'])} |" for d in diffs]
    else:
        lines.append("nothing but run name, seed and output folder: repeats of one configuration")
    lines += ["", "| figure | base | candidate | ratio | 95% interval | verdict |", "| --- | --- | --- | --- | --- | --- |"]
    for f in result["figures"]:
        if f["verdict"] == "not measured":
            lines.append(f"| {f['figure']} | / | / | / | / | not measured |")
            continue
        ratio = f"{f['difference']:+.2f} pts" if "difference" in f else f"{f['ratio']:.3f}x"
        band = (f"±{f['margin']:.2f} pts" if "margin" in f else
                f"{f['interval'][0]:.3f}x - {f['interval'][1]:.3f}x" if f.get("interval") else
                f"tolerance {100 * f['tolerance']:.0f}%" if "tolerance" in f else "/")
        lines.append(f"| {f['figure']} | {f['base']:.4g} | {f['candidate']:.4g} | {ratio} | {band} | {f['verdict']} |")
    notes = sorted({f["note"] for f in result["figures"] if f.get("note")})
    lines += [""] + [f"Note: {n}" for n in notes] + ([""] if notes else [])
    rep = result["repeats"]
    lines.append(f"Runs pooled: base {rep['base']['runs']}, candidate {rep['candidate']['runs']} (p_core steady "
                 f"median {_fmt(rep['candidate']['p_core_steady_median'])}, min-max "
                 f"{_fmt(rep['candidate']['p_core_steady_min'])}-{_fmt(rep['candidate']['p_core_steady_max'])}"
                 + (f", olympic mean {_fmt(rep['candidate']['p_core_steady_olympic_mean'])}"
                    if rep['candidate']['p_core_steady_olympic_mean'] else "") + "); sides with fewer than "
                 f"{stats.MIN_RUNS_FOR_SPREAD} runs carry a launch-to-launch spread of "
                 f"{100 * result['launch_noise']:.0f}%.")
    p = result["parity"]
    if p["verdict"] == "not compared":
        lines += ["", f"Parity: not compared ({p['note']})."]
    else:
        evals = ", ".join(f"step {e['step']}: {e['candidate']:.2f} vs {e['base']:.2f} (±{e['margin']:.2f})"
                          for e in p["evals"]) or "none in common"
        lines += ["", f"Parity: **{p['verdict']}** — training loss mean relative error "
                      f"{100 * p['loss_mean_relative_error']:.2f}% over {p['steps_compared']} steps after step "
                      f"{p['after_warmup_step']} (threshold {100 * p['threshold']:.0f}%); top-1 at common "
                      f"evaluations: {evals}."]
    return "\n".join(lines) + "\n"


def charts(base: Side, cands: list[Side], out_dir: Path) -> list[Path]:
    """step_times.png (steady per-step time distributions side by side) and curves.png (loss and top-1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    everyone = [base, *cands]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(everyone)), 4))
    data = [np.concatenate([r["step_times"]["compute_s"] for r in s.runs if r.get("step_times")] or [np.zeros(1)])
            for s in everyone]
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(everyone) + 1), [s.name for s in everyone], fontsize=7)
    ax.set_ylabel("compute seconds per step (steady)")
    ax.set_title("Step times")
    fig.tight_layout()
    paths = [out_dir / "step_times.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for s in everyone:
        curve = losses(s.dirs[0]) if s.dirs else {}
        ax1.plot(sorted(curve), [curve[k] for k in sorted(curve)], label=s.name)
        evals = s.runs[0].get("evals", [])
        ax2.plot([e["step"] for e in evals], [e["acc1"] for e in evals], marker="o", label=s.name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax2.set_xlabel("step")
    ax2.set_ylabel("top-1 (%)")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "curves.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths
