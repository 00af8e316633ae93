#!/usr/bin/env python
"""GPU sweep: ViT-B/16 for a bounded number of steps across precisions, ZeRO stages, torch.compile and loaders,
one `python train_vit.py` process per configuration, then a table of p_core, p_train, MFU and memory
read from each run's results.json, and beside each row bench/ceiling.py's plain-PyTorch step of the same work
(ours / ceiling of p_core steady: what our machinery costs). On an H200 a configuration took ~45 s (most of
it process start-up), so the 7 eager rows take ~5 minutes, the ceilings about as long again; the two --compile
rows add their compile time.

    python bench/gpu_sweep.py                 # on a GPU machine (demo shards at 224 px as input)
    python bench/gpu_sweep.py --configs bf16_z1_wds,bf16_z1_dali --steps 80   # a subset, side by side
    python bench/gpu_sweep.py --cpu-smoke     # the same machinery on CPU with a tiny model

Writes bench/out/gpu_sweep.md and bench/out/gpu_sweep.jsonl (a row as each run ends, so a sweep cut short
keeps what it measured; --append adds to it); prints the table last.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# (precision, ZeRO stage, compile, loader): precisions at ZeRO-1, stages in bf16, compile in bf16 and tf32,
# the DALI loader against the default one in bf16 (p_train / p_core says how much data loading still costs).
GPU_CONFIGS = [("fp32", 1, False, "wds"), ("tf32", 1, False, "wds"), ("amp", 1, False, "wds"),
               ("bf16", 1, False, "wds"), ("bf16", 1, False, "dali"), ("bf16", 0, False, "wds"),
               ("bf16", 2, False, "wds"), ("bf16", 1, True, "wds"), ("tf32", 1, True, "wds")]
CPU_CONFIGS = [("fp32", 0, False, "wds"), ("fp32", 1, False, "wds"), ("fp32", 2, False, "wds"),
               ("fp32", 1, False, "dali"), ("bf16", 1, False, "wds"), ("amp", 1, False, "wds")]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, 3 steps: check the sweep runs on CPU")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per configuration")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    p.add_argument("--configs", default=None,
                   help="comma-separated config names to run (e.g. bf16_z1_wds,bf16_z1_dali); default: all")
    p.add_argument("--append", action="store_true", help="add rows to gpu_sweep.jsonl instead of starting it anew")
    p.add_argument("--no-ceiling", action="store_true", help="skip bench/ceiling.py beside each row")
    args = p.parse_args()

    from vitbench.data import demo

    shards = demo.build(progress=False)
    if args.cpu_smoke:
        configs, steps = CPU_CONFIGS, args.steps or 3
        model = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8", "--model-kwargs",
                 "depth=2", "--batch-size", "8", "--global-batch-size", "8", "--workers", "1"]
        ceiling_args = ["--cpu-smoke"]
    else:
        configs, steps = GPU_CONFIGS, args.steps or 40
        model = ["--model", "vit_base_patch16_224", "--batch-size", str(args.batch_size), "--global-batch-size",
                 str(args.batch_size), "--workers", str(args.workers)]
        ceiling_args = ["--model", "vit_base_patch16_224", "--batch-size", str(args.batch_size)]
    names = {config_name(*c): c for c in configs}
    if args.configs:
        unknown = sorted(set(args.configs.split(",")) - set(names))
        if unknown:
            p.error(f"unknown --configs {unknown}; known: {', '.join(names)}")
        configs = [names[n] for n in args.configs.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.append:
        (args.out / "gpu_sweep.jsonl").write_text("")
    rows = []
    for prec, stage, compile_, loader in configs:
        name = config_name(prec, stage, compile_, loader)
        run_dir = args.out / "runs" / name
        cmd = [sys.executable, str(REPO / "train_vit.py"), *model, "--data-dir", str(shards), "--precision", prec,
               "--zero-stage", str(stage), "--max-steps", str(steps), "--log-interval", "10",
               "--timing-warmup-steps", str(min(10, steps - 1)), "--eval-every", "1000", "--wandb", "off",
               "--output-dir", str(run_dir), "--eval-batch-size", "250", "--loader", loader,
               *(["--compile"] if compile_ else [])]
        t = time.time()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        row = {"config": name, "precision": prec, "zero_stage": stage, "compile": compile_, "loader": loader,
               "wall_s": round(time.time() - t, 1)}
        if proc.returncode == 0:
            r = json.loads((run_dir / "results.json").read_text())
            row.update({k: r.get(k) for k in ("p_core", "p_train", "p_core_steady", "p_train_steady",
                                              "mfu_core(%)", "mfu_train(%)", "mem_used_gib", "mem_total_gib",
                                              "mem_max_allocated_gib", "mem_max_reserved_gib", "compile_s")})
            row["device"] = r["environment"].get("device_name")
            row["p_train_over_p_core"] = r["p_train_steady"] / r["p_core_steady"] if r.get("p_core_steady") else None
        else:
            row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "stderr.log").write_text(proc.stderr)  # the whole story, for the failed row
        if not args.no_ceiling:  # the plain-PyTorch step of the same work, in the same sweep run
            row.update(ceiling(ceiling_args, prec, compile_, steps))
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out / "gpu_sweep.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    table = markdown(rows, steps)
    (args.out / "gpu_sweep.md").write_text(table)
    print(table)
    return 0 if all("error" not in r for r in rows) else 1


def ceiling(ceiling_args: list[str], prec: str, compile_: bool, steps: int) -> dict:
    """bench/ceiling.py for a row: the plain-PyTorch step of the same model, precision, batch and compile
    setting, in its own process like the row; ours / ceiling of p_core steady is added by markdown()."""
    warmup = min(10, steps - 1)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "ceiling.py"), *ceiling_args, "--precision", prec,
                           "--steps", str(steps - warmup), "--warmup", str(warmup),
                           *(["--compile"] if compile_ else [])], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"ceiling_error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    c = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"ceiling_img_per_s": c["img_per_s_steady"], "ceiling_warmup_s": c["warmup_s"]}


def config_name(prec: str, stage: int, compile_: bool, loader: str) -> str:
    return f"{prec}_z{stage}{'_compile' if compile_ else ''}_{loader}"


def markdown(rows, steps) -> str:
    def f(v, d=1):
        return "-" if v is None else f"{v:.{d}f}"

    lines = [f"{steps} steps per configuration; steady = after the first warm-up steps.", "",
             "| config | p_core | p_train | p_core steady | p_train steady | p_train/p_core steady | ceiling "
             "(plain PyTorch) | ours/ceiling | MFU core % | MFU train % | mem used/total GiB | max allocated GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error']} |||||||||||")
            continue
        ceil = r.get("ceiling_img_per_s")
        ratio = r["p_core_steady"] / ceil if ceil and r.get("p_core_steady") else None
        lines.append(f"| {r['config']} | {f(r['p_core'])} | {f(r['p_train'])} | {f(r['p_core_steady'])} | "
                     f"{f(r['p_train_steady'])} | {f(r['p_train_over_p_core'], 3)} | {f(ceil)} | {f(ratio, 3)} | "
                     f"{f(r['mfu_core(%)'])} | {f(r['mfu_train(%)'])} | "
                     f"{f(r['mem_used_gib'])}/{f(r['mem_total_gib'])} | {f(r['mem_max_allocated_gib'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
