"""results.json: one run's six figures and everything needed to trust and compare them. `build` makes it,
the report (vitbench.reporting) and the study read it; the W&B run gets the same summary and the report's row.

Keys (figures in images/s, seconds and GiB; None where a run did not produce one):
  run_name, world_size, nnodes, nproc_per_node     the launch
  precision, zero_stage, zero_stage_requested      as run (one process runs ZeRO-0; reports compare by requested)
  global_batch_size, global_step, resumed_from_step, epochs_done, interrupted
  loader, epoch_sampling, pass_coverage            how train samples were drawn
  e2e_time                                          process start to results, slowest rank
  p_whole, p_train, p_core (+ *_steady)            FlagPerf's throughputs (vitbench.profiler's windows)
  mem, mem_used_gib, mem_total_gib                 device memory used / total (the profiler's probe)
  final_acc1, final_acc5, val_loss, eval_samples   the last evaluation, over val_num_samples samples
  val_num_samples, reached_target
  skipped_corrupt {train, validation}              samples dropped as unreadable, summed over ranks
  fix_hp                                           recipe flags changed from FlagPerf's
  nccl_busbw_gbps                                  the user's nccl-tests figure (--nccl-busbw)
  precision_in_effect                              what the engine actually ran (verified at the first step)
  replica_checksums                                every rank's weights digest (ZeRO 0-2): all equal
  evals [{epoch, step, acc1, acc5, loss, samples}]  every evaluation
  environment, config, plan                        the machine, the flags, and every decision (Plan.to_json)
  checkpoint_time, checkpoint_max_s                every save of this launch (periodic, preemption, final), s;
                                                   the longest one (size SLURM's --signal lead from it)
  checkpoints [{step, seconds, bytes}]             each save
  energy_j, energy_j_per_device, energy_source     joules over the train window (vitbench.monitor; None: no sensor)
  power_avg_w_per_device, power_peak_w_per_device, temp_peak_c_per_device
  img_per_joule, img_per_joule_per_device          trained samples / joules (all devices; one device's share)
  hw_monitor {interval_s, samples, sensors}        each sensor available, or absent with the reason
  checkpoint_time_in_train_window                  the periodic saves inside the train window (out of p_train)
  step_times {first_step, block, samples_per_step, train_s, compute_s, paused_per_step_s}
                                                   the steady steps' seconds (slowest rank; averaged in blocks
                                                   past 20,000 points): what report.py compare resamples
  spread {p_core_steady, p_train_steady, p_whole_steady: {mean, median, p5, p95, ci95, steps, block}}
  compile_s                                        with --compile: the first step's extra time
  deepspeed_throughput_timer                       with --deepspeed-throughput-timer: DeepSpeed's figure
  (plus the profiler's other timing keys: vitbench.profiler.StepTimer.summary)
"""

from __future__ import annotations

from vitbench import metrics as M
from vitbench.reporting import WANDB_COLUMNS, num, numeric_row

RESULTS_FILE = "results.json"
# The unit of each figure, written into every results.json ("units") so a reader needs no code.
UNITS = {"e2e_time": "s", "p_whole": "img/s", "p_train": "img/s", "p_core": "img/s", "*_steady": "img/s",
         "final_acc1": "% top-1", "final_acc5": "% top-5", "val_loss": "nats (cross-entropy)", "mem": "GiB used/total",
         "mem_*_gib": "GiB", "*_time": "s", "checkpoint_max_s": "s", "checkpoints.bytes": "bytes",
         "compile_s": "s", "nccl_busbw_gbps": "GB/s", "energy_j": "J", "power_*_w": "W", "temp_*_c": "degrees C",
         "img_per_joule": "images/J"}
SUMMARY_KEYS = ("e2e_time", "p_whole", "p_train", "p_core", "final_acc1", "final_acc5", "val_loss", "mem_used_gib",
                "mem_total_gib", "p_whole_steady", "p_train_steady", "p_core_steady")


def build(*, plan, run_name: str, global_step: int, resumed_from_step: int, epochs_done: int, interrupted: bool,
          evals: list[dict], reached_target: bool, train_skipped: int, e2e_time: float, timing: dict,
          precision_in_effect: dict, replica_checksums: list | None, environment: dict, config: dict,
          checkpoint_saves: list[dict] = (), hardware: dict | None = None,
          deepspeed_throughput_timer: dict | None = None) -> dict:
    """results.json of a run made by PLAN (vitbench.plan.Plan); TIMING: StepTimer.summary()."""
    final = evals[-1] if evals else None
    results = {
        "run_name": run_name, **plan.layout, "precision": plan.precision.label, "zero_stage": plan.zero_stage,
        "zero_stage_requested": plan.zero_stage_requested, "global_batch_size": plan.recipe.global_batch_size,
        "global_step": global_step, "resumed_from_step": resumed_from_step, "epochs_done": epochs_done,
        "interrupted": interrupted, "loader": plan.loader.kind, "epoch_sampling": plan.epoch_sampling,
        "pass_coverage": plan.pass_coverage,
        "eval_samples": final[M.EVAL_SAMPLES] if final else 0, "val_num_samples": plan.val.num_samples,
        "final_acc1": final[M.ACC1] if final else None, "final_acc5": final[M.ACC5] if final else None,
        "val_loss": final[M.VAL_LOSS] if final else None, "reached_target": reached_target,
        "skipped_corrupt": {"train": train_skipped, "validation": final["skipped"] if final else 0},
        "e2e_time": e2e_time, **timing,
        "checkpoint_time": sum(c["seconds"] for c in checkpoint_saves), "checkpoints": list(checkpoint_saves),
        "checkpoint_max_s": max((c["seconds"] for c in checkpoint_saves), default=None),
        **(hardware or {}),
        "mem": f"{timing['mem_used_gib']:.1f}/{timing['mem_total_gib']:.1f}" if "mem_used_gib" in timing else None,
        "fix_hp": plan.fix_hp, "nccl_busbw_gbps": plan.measurement.nccl_busbw_gbps,
        "precision_in_effect": precision_in_effect, "replica_checksums": replica_checksums,
        "evals": evals, "environment": environment, "config": config, "plan": plan.to_json(), "units": UNITS,
    }
    if plan.measurement.compile:  # reported apart; the steady figures leave it out, FlagPerf's whole windows keep it
        results["compile_s"] = timing.get("first_step_extra_s")
    if deepspeed_throughput_timer is not None:  # an independent second opinion on p_core (it syncs each step)
        results["deepspeed_throughput_timer"] = deepspeed_throughput_timer
    return results


def summary(results: dict) -> dict:
    """The W&B run summary: the figures a dashboard compares runs by, with each steady figure's spread (median,
    p5/p95 and the 95% interval of the mean: vitbench.stats) and the energy figures where measured."""
    out = {k: results[k] for k in SUMMARY_KEYS if k in results}
    for figure, s in (results.get("spread") or {}).items():
        if s:
            out.update({f"{figure}_median": s["median"], f"{figure}_p5": s["p5"], f"{figure}_p95": s["p95"],
                        f"{figure}_ci95_low": s["ci95"][0], f"{figure}_ci95_high": s["ci95"][1]})
    out.update({k: results[k] for k in ("energy_j", "img_per_joule") if results.get(k) is not None})
    return out


def table(results: dict) -> tuple[list, list]:
    """(columns, row) of the report's table for this run, figures as numbers (W&B's table sorts and plots them)."""
    return list(WANDB_COLUMNS), numeric_row(results)


def headline(results: dict) -> str:
    r = results
    return (f"e2e_time {r['e2e_time']:.1f}s  p_whole {num(r['p_whole'], 1)}  p_train {num(r['p_train'], 1)}  "
            f"p_core {num(r['p_core'], 1)} img/s  final_acc1 {num(r['final_acc1'], 1)}  mem {r['mem']} GiB")
