"""miniworld/stats.py: the benchmark's bootstrap intervals and paired differences, against a slow straightforward
implementation (numpy's percentile over explicitly looped resamples), closed forms and exact edge cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from comfyui_personalize.miniworld import stats


def slow_bootstrap(values, level, resamples, seed):
    """Loop over the same resampled index rows, mean each, numpy's (linear) percentile."""
    idx = stats.resample_indices(len(values), resamples, seed).numpy()
    means = [sum(float(values[j]) for j in row) / len(row) for row in idx]
    alpha = 1 - level
    return float(np.percentile(means, 100 * alpha / 2)), float(np.percentile(means, 100 * (1 - alpha / 2)))


@pytest.mark.parametrize("level", [0.95, 0.8])
def test_bootstrap_matches_the_slow_reference(level):
    values = torch.randn(12, generator=torch.Generator().manual_seed(3)).tolist()
    got = stats.bootstrap(values, level=level, resamples=2000, seed=5)
    low, high = slow_bootstrap(values, level, 2000, 5)
    assert got.low == pytest.approx(low, abs=1e-12) and got.high == pytest.approx(high, abs=1e-12)
    assert got.mean == pytest.approx(sum(values) / len(values), abs=1e-12)
    assert got.low < got.mean < got.high


def test_bootstrap_is_seeded_and_depends_on_the_seed():
    values = torch.rand(12, generator=torch.Generator().manual_seed(0)).tolist()
    assert stats.bootstrap(values, resamples=500, seed=1) == stats.bootstrap(values, resamples=500, seed=1)
    assert stats.bootstrap(values, resamples=500, seed=1) != stats.bootstrap(values, resamples=500, seed=2)


def test_bootstrap_approaches_the_normal_closed_form():
    """Large n: the percentile interval of the mean is mean ± z·s/√n (s with divisor n, the bootstrap's own)."""
    x = torch.randn(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3 + 0.5
    got = stats.bootstrap(x, resamples=20_000, seed=0)
    half = 1.959964 * float(x.std(unbiased=False)) / math.sqrt(len(x))
    assert got.high - got.low == pytest.approx(2 * half, rel=0.05)
    assert (got.low + got.high) / 2 == pytest.approx(float(x.mean()), abs=0.1 * half)


def test_bootstrap_coverage_on_normal_samples():
    """Across 200 datasets of 30 draws from N(0.2, 1) the 95 % interval holds the true mean 88-99 % of the time."""
    gen = torch.Generator().manual_seed(11)
    hits = 0
    for k in range(200):
        ci = stats.bootstrap(torch.randn(30, generator=gen) + 0.2, resamples=1000, seed=k)
        hits += ci.low <= 0.2 <= ci.high
    assert 0.88 <= hits / 200 <= 0.99, hits


def test_constant_values_give_a_zero_width_interval():
    ci = stats.bootstrap([0.25] * 7)
    assert (ci.mean, ci.low, ci.high) == (0.25, 0.25, 0.25) and ci.excludes_zero


def test_one_subject_gives_no_interval():
    ci = stats.bootstrap([0.4])
    assert ci.mean == 0.4 and ci.low == -math.inf and ci.high == math.inf and not ci.excludes_zero


def test_paired_difference_of_identical_rows_is_exactly_zero():
    a = [0.3, -0.07, 0.95, 0.4]
    d = stats.paired_difference(a, list(a))
    assert (d.mean, d.low, d.high) == (0.0, 0.0, 0.0) and not d.excludes_zero


def test_paired_difference_is_the_bootstrap_of_the_differences():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.rand(12, generator=gen), torch.rand(12, generator=gen)
    assert stats.paired_difference(a, b, seed=4) == stats.bootstrap(a.double() - b.double(), seed=4)
    shifted = stats.paired_difference(b + 0.5, b)  # a constant shift: exact, zero width, excludes 0
    assert shifted.low == pytest.approx(0.5) and shifted.high == pytest.approx(0.5) and shifted.excludes_zero


def test_pairing_narrows_the_interval_against_unpaired_rows():
    """Rows that share a large per-subject effect: the paired interval is far narrower than either row's own."""
    gen = torch.Generator().manual_seed(2)
    subject = torch.rand(12, generator=gen)
    a, b = subject + 0.05 + 0.01 * torch.randn(12, generator=gen), subject
    d, own = stats.paired_difference(a, b), stats.bootstrap(a)
    assert d.excludes_zero and (d.high - d.low) < 0.2 * (own.high - own.low)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same subjects"):
        stats.paired_difference([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least one value"):
        stats.bootstrap([])
    with pytest.raises(ValueError, match="non-finite"):
        stats.bootstrap([1.0, float("nan")])
    with pytest.raises(ValueError, match="level"):
        stats.bootstrap([1.0], level=1.5)
