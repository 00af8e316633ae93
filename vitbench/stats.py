"""Intervals for throughput figures from per-step times, which are autocorrelated (clocks, thermal state, loader
phases, neighbours on a shared host): treating steps as independent samples understates the interval. A
circular moving-block bootstrap resamples runs of consecutive steps instead (Politis & Romano; block length
~ n^(1/3)), and where several runs are pooled, the runs themselves are resampled first, so the between-run spread
widens the interval. Where a side has fewer than `MIN_RUNS_FOR_SPREAD` runs, its between-launch spread cannot be
estimated and a stated floor is applied instead (`launch_noise`, relative, lognormal).
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 2000
MIN_RUNS_FOR_SPREAD = 3
DEFAULT_LAUNCH_NOISE = 0.15  # 15%: what keeps identical launches on these CPU machines within noise (BENCHMARKS.md)


def block_length(n: int) -> int:
    return max(1, int(round(1.5 * n ** (1 / 3))))


def block_means(x: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """RESAMPLES means of X, each from a circular moving-block bootstrap sample of len(X). The resamples are drawn
    in chunks of at most ~2M indices, so 20,000 steps cost ~16 MB at a time, not 2,000 x 20,000 at once."""
    n = len(x)
    b = min(block_length(n), n)
    blocks = math.ceil(n / b)
    chunk = max(1, (1 << 21) // (blocks * b))
    out = []
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        starts = rng.integers(0, n, size=(k, blocks))
        index = (starts[:, :, None] + np.arange(b)[None, None, :]).reshape(k, -1)[:, :n] % n
        out.append(x[index].mean(axis=1))
    return np.concatenate(out)


def rate_resamples(runs: list[np.ndarray], samples_per_step: float, rng: np.random.Generator,
                   resamples: int = RESAMPLES, launch_noise: float = DEFAULT_LAUNCH_NOISE,
                   extra_per_step: list[float] | None = None) -> np.ndarray:
    """Bootstrap draws of the throughput (samples / s) of RUNS (each an array of per-step seconds), pooled as the
    mean over runs. EXTRA_PER_STEP: each run's fixed seconds per step on top (pauses, for p_whole)."""
    extra = extra_per_step or [0.0] * len(runs)
    per_run = np.stack([samples_per_step / (block_means(np.asarray(r, float), resamples, rng) + e)
                        for r, e in zip(runs, extra)])  # (runs, resamples)
    if len(runs) > 1:  # the runs themselves resampled: between-run spread
        per_run = per_run[rng.integers(0, len(runs), size=(len(runs), resamples)), np.arange(resamples)]
    pooled = per_run.mean(axis=0)
    if len(runs) < MIN_RUNS_FOR_SPREAD and launch_noise:  # no estimate of the launch-to-launch spread: the floor
        pooled = pooled * np.exp(rng.normal(0.0, launch_noise / math.sqrt(len(runs)), size=resamples))
    return pooled


def interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.quantile(draws, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def spread(step_seconds: np.ndarray, samples_per_step: float, extra_per_step: float = 0.0, seed: int = 0) -> dict:
    """One run's throughput figures from its steady steps: mean, median, p5/p95 of the per-step rate, and the
    95% interval of the mean rate (block bootstrap, no launch floor: this run's own step noise)."""
    x = np.asarray(step_seconds, float)
    if len(x) < 2:
        return {}
    per_step = samples_per_step / (x + extra_per_step)
    draws = rate_resamples([x], samples_per_step, np.random.default_rng(seed), launch_noise=0.0,
                           extra_per_step=[extra_per_step])
    lo, hi = interval(draws)
    return {"mean": float(samples_per_step / (x.mean() + extra_per_step)), "median": float(np.median(per_step)),
            "p5": float(np.quantile(per_step, 0.05)), "p95": float(np.quantile(per_step, 0.95)),
            "ci95": [lo, hi], "steps": int(len(x)), "block": block_length(len(x))}


def olympic_mean(values: list[float]) -> float | None:
    """MLPerf's: the mean without the fastest and the slowest (5 or more values)."""
    if len(values) < 5:
        return None
    return float(np.mean(sorted(values)[1:-1]))
