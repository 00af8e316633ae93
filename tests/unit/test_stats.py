"""The statistics behind comparisons, on synthetic step times whose truth is known. In-process, about a second."""

import numpy as np
import pytest

from vitbench import stats


def ar1(n: int, phi: float, mean: float, rng) -> np.ndarray:
    """Autocorrelated step times (AR(1)) around MEAN seconds: what a steady window looks like."""
    e = rng.normal(0.0, 0.02 * mean, size=n)
    x = np.empty(n)
    x[0] = e[0]
    for i in range(1, n):
        x[i] = phi * x[i - 1] + e[i]
    return mean + x


def test_the_block_bootstrap_interval_covers_the_true_rate_of_autocorrelated_steps():
    rng = np.random.default_rng(0)
    true_step, batch, covered, naive_covered, trials = 0.5, 256, 0, 0, 150
    for _ in range(trials):
        x = ar1(400, 0.8, true_step, rng)
        draws = stats.rate_resamples([x], batch, rng, resamples=400, launch_noise=0.0)
        lo, hi = stats.interval(draws)
        covered += lo <= batch / true_step <= hi
        se = x.std() / np.sqrt(len(x))  # the interval that treats steps as independent
        naive_covered += batch / (x.mean() + 1.96 * se) <= batch / true_step <= batch / (x.mean() - 1.96 * se)
    assert covered / trials >= 0.85  # near the nominal 95%; block bootstrap under-covers a little at n=400
    assert naive_covered / trials < covered / trials  # independence understates the interval


def test_pooled_runs_widen_the_interval_by_their_spread_and_a_single_run_gets_the_floor():
    rng = np.random.default_rng(1)
    same = [ar1(300, 0.5, 0.5, rng) for _ in range(3)]
    spread_apart = [ar1(300, 0.5, m, rng) for m in (0.45, 0.5, 0.55)]
    width = lambda runs, **kw: np.subtract(*stats.interval(stats.rate_resamples(runs, 256, rng, **kw))[::-1])
    assert width(spread_apart) > 2 * width(same)
    assert width(same[:1], launch_noise=0.1) > 5 * width(same[:1], launch_noise=0.0)


def test_spread_of_one_run():
    rng = np.random.default_rng(2)
    x = ar1(200, 0.5, 0.25, rng)
    s = stats.spread(x, 64)
    assert s["p5"] <= s["median"] <= s["p95"] and s["ci95"][0] <= s["mean"] <= s["ci95"][1]
    assert s["mean"] == pytest.approx(64 / x.mean()) and s["steps"] == 200
    assert stats.spread(x[:1], 64) == {}


def test_olympic_mean_drops_the_fastest_and_the_slowest():
    assert stats.olympic_mean([1, 2, 3, 4, 100]) == 3.0 and stats.olympic_mean([1, 2, 3]) is None
