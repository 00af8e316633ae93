"""`report.py --out`: the study report from real short runs (1 and 2 processes, fp32 and a 16-bit precision,
ZeRO 1 and 2), its numbers checked against the runs' own results.json and metrics.jsonl."""

import json
import re

import pytest

from vitbench import metrics as M
from vitbench import study
from vitbench.reporting import sig
from vitbench.tracking import METRICS_FILE

from conftest import SHARED_STEPS, SHARED_TIMING_WARMUP, assert_picture, results, run_command, sixteen_bit

pytestmark = pytest.mark.slow
STEPS = SHARED_STEPS


@pytest.fixture(scope="module")
def runs(shared_runs):
    """The five layouts (tests/conftest.py): 1 and 2 processes, 2 machines, fp32 and a 16-bit precision, ZeRO 1
    and 2."""
    return shared_runs


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    proc = run_command("report", *runs.values(), "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out, (out / "report.md").read_text()


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_metrics_jsonl_has_a_row_per_step_and_marks_evaluations_and_checkpoints(runs):
    for name, run_dir in runs.items():
        rows = study.read_metrics(run_dir)
        r = results(run_dir)
        assert [row["step"] for row in rows if row["kind"] == "train"] == list(range(1, STEPS + 1))
        assert [row["step"] for row in rows if row["kind"] == "checkpoint"] == list(range(2, STEPS + 1, 2))
        assert [(row["step"], row[M.ACC1]) for row in rows if row["kind"] == "eval"] == \
            [(e["step"], e["acc1"]) for e in r["evals"]]
        assert (run_dir / METRICS_FILE).read_text().endswith("\n")


def test_scaling_compares_only_layouts_of_one_configuration(runs, report):
    out, text = report
    a, b, e = (results(runs[k]) for k in ("a_1p_fp32_z1", "b_2p_fp32_z1", "e_2m_fp32_z1"))
    scaling = section(text, "Scaling")
    rows = [line for line in scaling.splitlines() if re.match(r"\| \dx\d \|", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["1x1", "1x2", "2x1"]
    two = [c.strip() for c in rows[1].split("|")[1:-1]]
    assert two[2] == f"{b['p_train']:.1f}" and two[3] == f"{b['p_core']:.1f}"
    assert two[4] == f"{100 * b['p_train'] / (2 * a['p_train']):.1f}%"
    assert two[5] == f"{100 * b['p_core'] / (2 * a['p_core']):.1f}%"
    assert two[6:] == ["/", "/"]  # one node: no multi-node efficiency
    nodes = [c.strip() for c in rows[2].split("|")[1:-1]]  # 2 machines x 1 against 1 machine x 1 (FlagPerf's
    assert nodes[6] == f"{100 * e['p_train'] / (2 * a['p_train']):.1f}%"  # 2x8 vs 1x8 in miniature)
    assert nodes[7] == f"{100 * e['p_core'] / (2 * a['p_core']):.1f}%"
    # ZeRO-2 and the 16-bit run have no other layout: footnoted with what their nearest candidate differs in
    assert re.search(r"1x2\) fp32 ZeRO-2: not compared; .*also differs in zero_stage", scaling)
    assert re.search(rf"1x2\) {sixteen_bit()} ZeRO-1: not compared; .*also differs in precision", scaling)
    assert_picture(out / "scaling.png")


def test_precision_by_zero_matrix_holds_the_runs_figures(runs, report):
    out, text = report
    matrix = section(text, "Precision x ZeRO")
    b, c, d = (results(runs[k]) for k in ("b_2p_fp32_z1", "c_2p_fp32_z2", "d_2p_16bit_z1"))
    p_core = matrix.split("| p_core (img/s) |", 1)[1].split("\n\n", 1)[0]
    assert f"| fp32 | {b['p_core']:.1f} | {c['p_core']:.1f} |" in p_core
    assert f"| {d['precision']} | {d['p_core']:.1f} | / |" in p_core
    memory = matrix.split("| peak memory (GiB) |", 1)[1].split("\n\n", 1)[0]
    assert f"| fp32 | {b['mem_used_gib']:.2f} | {c['mem_used_gib']:.2f} |" in memory
    assert "1x1) fp32 ZeRO-1: not compared; the nearest run of another precision / zero_stage also differs in " \
           "layout" in matrix
    assert_picture(out / "matrix.png")


def test_report_has_the_table_the_timelines_and_each_runs_environment(runs, report):
    out, text = report
    for name, run_dir in runs.items():
        r = results(run_dir)
        assert f"| {sig(r['p_whole'])} | {sig(r['p_train'])} | {sig(r['p_core'])} |" in section(text, "The six figures")
        assert f"![steps of {name}](steps_{name}.png)" in text
        assert_picture(out / f"steps_{name}.png")
        env = r["environment"]
        assert f"| {name} | {env['device_name']} | / | {env['torch']} | {env['deepspeed']} | {env['git_commit']} |" \
            in section(text, "Environment")
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (out / image).is_file(), image
    assert json.loads((runs["a_1p_fp32_z1"] / "results.json").read_text())["run_name"] == "a_1p_fp32_z1"


def test_stragglers_show_each_multi_rank_runs_slowest_and_fastest_rank(runs, report):
    _, text = report
    table = section(text, "Stragglers")
    for name, run_dir in runs.items():
        r = results(run_dir)
        listed = any(line.startswith(f"| {study.run_label(r)} |") for line in table.splitlines())
        assert listed == (r["world_size"] > 1), name
        if r["world_size"] > 1:
            assert 0 < r["compute_time_fastest_rank"] <= r["compute_time"]
            assert 0 <= r["data_wait_time_fastest_rank"] <= r["data_wait_time"]
            ms = 1000 * r["compute_time"] / (r["train_samples"] // r["global_batch_size"])
            assert f"| {study.run_label(r)} | {ms:.1f} |" in table


def test_the_study_shows_each_steady_figures_spread_and_parity_against_fp32(runs, report):
    _, text = report
    spread = section(text, "Spread of the steady figures")
    for name, run_dir in runs.items():
        r = results(run_dir)
        s = r["spread"]["p_core_steady"]
        assert s["steps"] == STEPS - SHARED_TIMING_WARMUP and s["ci95"][0] <= s["mean"] <= s["ci95"][1]
        assert f"| {study.run_label(r)} | p_core_steady | {s['mean']:.1f} |" in spread
    parity = section(text, "Convergence parity against fp32")
    sixteen, fp32 = results(runs["d_2p_16bit_z1"]), results(runs["b_2p_fp32_z1"])
    row = next(line for line in parity.splitlines() if line.startswith(f"| {study.run_label(sixteen)} |"))
    assert f"| {study.run_label(fp32)} |" in row and ("trains like the base" in row or "differs" in row)
