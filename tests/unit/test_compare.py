"""`report.py compare`: what differs, ratios with intervals and a verdict, repeats pooled, convergence parity.
In-process on runs written here with known step times; real launches are in test_compare_runs.py."""

import json

import numpy as np
import pytest

from vitbench import compare

from conftest import command

report = command("report")  # report.py, in-process


def run(tmp_path, name, *, step=0.5, noise=0.02, depth=2, workers=4, seed=0, loss_scale=1.0, acc=80.0, n=200,
        with_steps=True, rng=None):
    """A run folder: results.json with steady step times around STEP seconds, and metrics.jsonl's loss curve."""
    rng = rng or np.random.default_rng(abs(hash(name)) % 2**32)
    times = step * (1 + noise * rng.standard_normal(n))
    plan = {"model": "vit_tiny_patch16_224", "model_kwargs": {"depth": depth}, "loader": {"workers": workers},
            "recipe": {"seed": seed, "warmup_steps": 5, "lr": 1e-3}, "run_name": name, "output_dir": f"/runs/{name}",
            "precision": {"label": "fp32"}, "zero_stage": 0}
    r = {"run_name": name, "nnodes": 1, "nproc_per_node": 1, "world_size": 1, "precision": "fp32",
         "train_samples": 16 * n, "p_core_steady": 16 / times.mean(), "p_train_steady": 16 / (times.mean() + 0.1),
         "p_whole_steady": 16 / (times.mean() + 0.2), "mem_used_gib": 2.0, "e2e_time": 100.0, "final_acc1": acc,
         "eval_samples": 10_000, "evals": [{"step": 100, "acc1": acc, "samples": 10_000}], "plan": plan,
         "environment": {"torch": "2.14.1", "hostname": name}}
    if with_steps:
        r["step_times"] = {"first_step": 3, "block": 1, "samples_per_step": 16, "compute_s": times.tolist(),
                           "train_s": (times + 0.1).tolist(), "paused_per_step_s": 0.1}
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(r))
    rows = [{"kind": "train", "step": s, "loss": loss_scale * (2.3 * np.exp(-s / 60) + 0.2)} for s in range(1, 101)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    return d


def compared(base, *cands, **kw):
    b, groups = compare.sides([base], list(cands))
    return [compare.compare(b, g, **kw) for g in groups]


def verdicts(result):
    return {f["figure"]: f["verdict"] for f in result["figures"]}


def test_identical_launches_are_within_noise_and_train_alike(tmp_path):
    (res,) = compared(run(tmp_path, "a"), run(tmp_path, "a2"))
    assert verdicts(res)["p_core_steady"] == verdicts(res)["p_train_steady"] == "within noise"
    assert res["differences"] == [] and res["parity"]["verdict"] == "trains like the base"
    assert verdicts(res)["final_acc1"] == "within noise" and verdicts(res)["mem_used_gib"] == "within noise"


def test_a_deeper_model_is_slower_and_its_depth_is_listed_first(tmp_path):
    (res,) = compared(run(tmp_path, "a"), run(tmp_path, "b", step=1.5, depth=6, workers=2))
    p_core = next(f for f in res["figures"] if f["figure"] == "p_core_steady")
    assert p_core["verdict"] == "slower" and p_core["interval"][1] < 1 and p_core["ratio"] == pytest.approx(1 / 3, rel=0.05)
    fields = [d["field"] for d in res["differences"]]
    assert fields[0] == "plan.model_kwargs.depth" and "plan.loader.workers" in fields
    assert fields.index("plan.model_kwargs.depth") < fields.index("plan.loader.workers")
    assert "environment.hostname" not in fields  # repeats on other hosts are still repeats
    assert compare.slower_beyond(res, 10)


def test_fail_if_slower_is_a_regression_gate(tmp_path, capsys):
    a, b, a2 = run(tmp_path, "a"), run(tmp_path, "b", step=1.5), run(tmp_path, "a2")  # b: 3x the step time
    assert report.main(["compare", str(a), str(b), "--fail-if-slower", "10"]) == 1
    assert "slower than a by more than 10% beyond noise: b: p_core_steady" in capsys.readouterr().err
    assert report.main(["compare", str(a), str(a2), "--fail-if-slower", "10"]) == 0
    assert report.main(["compare", str(a), str(b), "--fail-if-slower", "90"]) == 0  # 0.33x is not 90% slower
    out = tmp_path / "out"
    capsys.readouterr()
    assert report.main(["compare", str(a), str(b), "--json", "--out", str(out)]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed[0]["candidate"] == "b" and (out / "compare.md").is_file()
    assert (out / "step_times.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0


def test_repeats_are_pooled_and_their_spread_widens_the_interval(tmp_path):
    bases = [run(tmp_path, f"a{i}", seed=i) for i in range(3)]  # 3+ runs a side: their own spread, no floor
    same = [run(tmp_path, f"r{i}", seed=i, step=0.5) for i in range(5)]  # repeats: only run name and seed differ
    apart = [run(tmp_path, f"s{i}", seed=i, step=s) for i, s in enumerate((0.4, 0.45, 0.5, 0.55, 0.6))]
    b, groups = compare.sides(bases, [*map(str, same)])
    assert len(groups) == 1 and len(groups[0].runs) == 5 and len(b.runs) == 3
    tight = compare.compare(b, groups[0])
    wide = compare.compare(b, compare.sides(bases, [*map(str, apart)])[1][0])
    base = bases[0]
    width = lambda res: np.subtract(*next(f for f in res["figures"] if f["figure"] == "p_core_steady")["interval"][::-1])
    assert width(wide) > 2 * width(tight)
    assert tight["repeats"]["candidate"]["p_core_steady_olympic_mean"] is not None  # 5 runs: MLPerf's olympic mean
    with pytest.raises(compare.ResultsError, match="not a repeat of a0"):
        compare.sides([base, run(tmp_path, "deep", depth=6)], [same[0]])


def test_a_results_file_without_step_times_compares_with_a_note(tmp_path):
    (res,) = compared(run(tmp_path, "a", with_steps=False), run(tmp_path, "b", step=0.8, with_steps=False))
    p_core = next(f for f in res["figures"] if f["figure"] == "p_core_steady")
    assert p_core["interval"] is None and "no step times" in p_core["note"] and p_core["verdict"] == "slower"
    assert "Note: no step times" in compare.markdown(res)


def test_parity_holds_for_a_close_curve_and_fails_for_a_diverging_one(tmp_path):
    base = run(tmp_path, "a")
    (close,) = compared(base, run(tmp_path, "seed1", loss_scale=1.01, seed=1))
    assert close["parity"]["verdict"] == "trains like the base"
    assert close["parity"]["loss_mean_relative_error"] == pytest.approx(0.01)
    (far,) = compared(base, run(tmp_path, "lr30", loss_scale=1.3))
    assert far["parity"]["verdict"] == "differs" and far["parity"]["loss_mean_relative_error"] > 0.02
    (acc,) = compared(base, run(tmp_path, "worse", acc=75.0))  # 5 points on 10,000 images: beyond the margin
    assert acc["parity"]["verdict"] == "differs" and not acc["parity"]["evals"][0]["within"]
    assert verdicts(acc)["final_acc1"] == "lower"
    assert compare.accuracy_margin(80, 50_000, 80, 50_000) == pytest.approx(100 * 1.96 * np.sqrt(2 * 0.16 / 50_000))


def test_parity_widens_to_what_the_bases_own_repeats_differ_by(tmp_path):
    base, repeat = run(tmp_path, "a"), run(tmp_path, "a_seed1", seed=1, loss_scale=1.05)
    cand = run(tmp_path, "seed2", seed=2, loss_scale=1.04)
    alone, _ = compare.sides([base], [cand])
    assert compare.compare(alone, _[0])["parity"]["verdict"] == "differs"  # 4% against FlagPerf's 2%
    pooled, groups = compare.sides([base, repeat], [cand])
    p = compare.compare(pooled, groups[0])["parity"]
    assert p["repeats_mean_relative_error"] == pytest.approx(0.05) and p["threshold"] == pytest.approx(0.05)
    assert p["verdict"] == "trains like the base"  # as close to the base as its own repeat is
