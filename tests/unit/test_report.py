"""report.py: the seed's table from recorded results files (golden text), charts, the W&B workspace."""

import json

import pytest

from vitbench import reporting

from conftest import DATA, GOLDEN, assert_picture, command, run_command

RESULTS = DATA / "results"
RUNS = [RESULTS / "a100_1x8.json", RESULTS / "a100_1x1.json", RESULTS / "a100_2x8.json"]


def report(*args):
    return run_command("report", *args)


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_table_matches_golden_text(lang):
    proc = report(*RUNS, "--lang", lang)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (GOLDEN / f"report_{lang}.md").read_text()


def test_config_labels_follow_the_seed():
    r = {"nnodes": 2, "nproc_per_node": 8, "environment": {"device_type": "cuda", "device_name": "NVIDIA H200"}}
    assert reporting.config_label(r) == "H200两机8卡(2x8)"
    assert reporting.config_label({**r, "nnodes": 1, "nproc_per_node": 1}) == "H200单机单卡(1x1)"
    assert reporting.config_label({**r, "nnodes": 4}, "en") == "H200 4 nodes x 8 devices (4x8)"


def test_scaling_efficiency_only_against_the_same_workload():
    results = reporting.load_results(RUNS)
    one_node, one_device, two_nodes = results
    assert reporting.describe(one_node)["batch_size"] == reporting.describe(one_device)["batch_size"]
    assert reporting.describe(two_nodes)["batch_size"] != reporting.describe(one_device)["batch_size"]
    eff = reporting.scaling_efficiency(results)
    per_device = one_node["p_train"] / one_node["world_size"] / one_device["p_train"]
    assert eff == [f"{100 * per_device:.1f}%", "base", "/"]  # 2x8 ran another micro-batch: no 1x1 row
    assert reporting.scaling_efficiency([one_device]) == ["/"]  # a lone 1x1 run is nobody's baseline
    assert "scaling" not in reporting.markdown_table([one_device], "en")


def test_plots_are_written(tmp_path):
    proc = report(*RUNS, "--plots", tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("throughput.png", "breakdown.png"):
        assert_picture(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["breakdown.png", "throughput.png"]


def test_missing_results_is_a_clear_error(tmp_path):
    proc = report(tmp_path)
    assert proc.returncode == 2 and f"{tmp_path}/results.json: no results.json" in proc.stderr


def test_workspace_is_built_with_the_standard_panels_without_sending():
    ws = reporting.build_workspace("my-team/vitbench")
    assert (ws.entity, ws.project) == ("my-team", "vitbench")
    names = [s.name for s in ws.sections]
    assert names[:6] == list(reporting.WORKSPACE_SECTIONS)
    plotted = {y for s in ws.sections for p in s.panels for y in (getattr(p, "y", None) or [])}
    expected = {k for panels in reporting.WORKSPACE_SECTIONS.values() for _, keys in panels for k in keys}
    assert plotted == expected
    accuracy = next(s for s in ws.sections if s.name == "Accuracy")
    assert all(p.x == "eval/epoch" for p in accuracy.panels)
    ws._to_model()  # the view W&B would receive serializes


def test_a_malformed_workspace_name_is_one_line(capsys):
    report = command("report")
    assert report.main(["--wandb-workspace", "no-slash"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --wandb-workspace wants ENTITY/PROJECT, got 'no-slash'\n"


@pytest.mark.parametrize("content, message", [("{}", "not a vitbench results.json (no nnodes"),
                                              ("[]", "not a vitbench results.json"),
                                              ('{"run_name": "x", "p_core": 1', "not readable JSON")],
                         ids=["empty_object", "a_list", "truncated"])
def test_a_broken_results_file_is_one_line_naming_it(tmp_path, content, message):
    bad = tmp_path / "results.json"
    bad.write_text(content)
    proc = report(tmp_path)  # alone: the report has nothing to show
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and f"error: {bad}: {message}" in proc.stderr
    proc = report(RUNS[0], tmp_path, "--lang", "en")  # among others: a footnote, the others still reported
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "| A100 1 node x 8 devices (1x8)" in proc.stdout and f"left out: {bad}: {message}" in proc.stdout


def test_an_interrupted_run_is_marked_in_the_table(tmp_path):
    r = json.loads(RUNS[1].read_text())
    (tmp_path / "results.json").write_text(json.dumps({**r, "interrupted": True, "global_step": 17}))
    proc = report(RUNS[0], tmp_path, "--lang", "en")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| A100")]
    assert "†" not in rows[0] and "†" in rows[1]
    assert "† A100 1 node x 1 device (1x1) " in proc.stdout and "interrupted at step 17" in proc.stdout


def _finished(r: dict, **kw) -> dict:
    """A recorded results.json as a finished run of a Plan: RECIPE_STEPS = epochs x steps per epoch."""
    plan = {"model": "vit_base_patch16_224", "img_size": 224, "model_kwargs": {},
            "recipe": {"epochs": 300, "batch_size": 256}, "measurement": {"compile": False}, "steps_per_epoch": 312,
            "total_steps": 300 * 312}
    return {**r, "plan": plan, "global_step": 300 * 312, "reached_target": False, **kw}


def test_a_max_steps_run_is_marked_as_stopped_before_its_recipe_ends(tmp_path):
    r = json.loads(RUNS[1].read_text())
    (tmp_path / "results.json").write_text(json.dumps(_finished(r, global_step=50)))
    proc = report(RUNS[0], tmp_path, "--lang", "en")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| A100")]
    assert "‡" not in rows[0] and "‡" in rows[1]
    assert "stopped by --max-steps at step 50 of the recipe's 93600 (300 epochs)" in proc.stdout
    assert reporting.stopped_early(_finished(r)) is None  # the whole schedule ran
    assert reporting.stopped_early(_finished(r, global_step=50, reached_target=True)) is None  # stopped at target


def test_the_table_says_the_zero_stage_that_ran_and_the_one_asked_for():
    r = json.loads(RUNS[1].read_text())
    assert reporting.zero_label({**r, "zero_stage": 0, "zero_stage_requested": 1}) == " ZeRO-0 (asked 1)"
    assert reporting.zero_label({**r, "zero_stage": 2, "zero_stage_requested": 2}) == " ZeRO-2"
    assert reporting.table_row({**r, "zero_stage": 0, "zero_stage_requested": 1}, "en")[0].endswith("ZeRO-0 (asked 1)")


@pytest.mark.parametrize("value, text", [(5.8512, "5.85"), (6.449, "6.45"), (6.54, "6.54"), (0.12345, "0.123"),
                                         (5109.4, "5109"), (73258.0, "73258"), (10.0, "10.0"), (99.96, "100"), (None, "/")])
def test_figures_keep_three_significant_digits(value, text):
    assert reporting.sig(value) == text


def test_every_column_names_its_unit_and_the_wandb_row_is_numbers():
    from vitbench import results

    for lang in ("zh", "en"):
        assert all("(" in c for c in reporting.COLUMNS[lang][3:])  # e2e_time (s) ... mem (GiB used/total)
    r = json.loads(RUNS[0].read_text())
    cols, row = results.table(r)
    assert len(cols) == len(row)
    figures = dict(zip(cols, row))
    assert figures["p_core (img/s)"] == r["p_core"] and isinstance(figures["p_whole (img/s)"], float)
    assert figures["mem used (GiB)"] == r["mem_used_gib"]


