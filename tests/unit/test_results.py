"""results.json's builder (vitbench/results.py): it records the Plan's decisions, and the W&B table is the
report's row."""

from vitbench import cli, plan, reporting, results
from vitbench import metrics as M
from vitbench.runinfo import MachineFacts

CPU = MachineFacts("cpu", "a CPU", None, fp16=False, bf16=True, autocast=True, cpus=2)


def test_results_record_the_plans_decisions_and_the_wandb_table_is_the_reports(demo_shards):
    flags = cli.parse_args(["--data-dir", str(demo_shards), "--model", "vit_tiny_patch16_224", "--img-size", "32",
                            "--patch-size", "8", "--model-kwargs", "depth=2", "--checkpoint-every", "7",
                            "--eval-every", "3", "--mixup", "0", "--cutmix", "0", "--peak-tflops", "12.5"])
    p = plan.make_plan(flags, {"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}, CPU, cli.REPO)
    timing = {"p_whole": 10.0, "p_train": 11.0, "p_core": 12.0, "mem_used_gib": 1.0, "mem_total_gib": 2.0}
    evals = [{"epoch": 1, "step": 5, M.ACC1: 40.0, M.ACC5: 90.0, M.VAL_LOSS: 1.5, M.EVAL_SAMPLES: 50, "skipped": 0}]
    out = results.build(plan=p, run_name="r", global_step=5, resumed_from_step=0, epochs_done=1, interrupted=False,
                        evals=evals, reached_target=False, train_skipped=0, e2e_time=20.0, timing=timing,
                        precision_in_effect={}, replica_checksums=None, environment={}, config={})
    decided = out["plan"]
    assert decided["recipe"]["loss"] == "label-smoothing-cross-entropy" and decided["recipe"]["smoothing"] == 0.11
    assert decided["checkpoints"] == {"every_steps": 7, "keep": 2}
    assert decided["evaluation"] == {"every_epochs": 3, "batch_size": 512, "target_acc1": 79.98}
    assert decided["measurement"]["peak_tflops"] == 12.5 and decided["measurement"]["log_interval"] == 20
    assert decided["tracking"]["mode"] == "online" and decided["recipe"]["seed"] == 41
    assert (out["final_acc1"], out["eval_samples"], out["mem"]) == (40.0, 50, "1.0/2.0")
    columns, row = results.table(out)
    # W&B's table: the report's columns with their units, the figures as numbers (sortable), memory as two
    assert columns == reporting.WANDB_COLUMNS and row == reporting.numeric_row(out)
    assert columns[:8] == reporting.COLUMNS["en"][:8] and row[:3] == reporting.table_row(out, "en")[:3]
    assert dict(zip(columns, row))["mem used (GiB)"] == 1.0
    assert reporting.describe(out)["batch_size"] == 256  # the report reads the Plan's decisions
