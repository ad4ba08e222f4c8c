"""Confidence intervals for the benchmark (`make eval`): the percentile bootstrap over subjects (Efron & Tibshirani
1993, "An Introduction to the Bootstrap", §13.3) and paired differences. Pure torch, float64, seeded.

Subjects are the unit of resampling: a row's score per subject (its mean over reference-view draws, prompts and
seeds) is one observation, so the interval says how far the row's mean could move on another set of subjects like
these. For ``n`` per-subject scores ``x``:

    x*_b = x[I_b],  I_b ~ Uniform{0..n-1}^n  (b = 1..B, with replacement)
    interval = [q_{α/2}, q_{1-α/2}] of the B means mean(x*_b)       (α = 1 - level; q: linear interpolation)

A paired difference of rows A and B on the same subjects, prompts and seeds is the bootstrap of ``d = a - b``
(the same resampled subjects for both rows): "A beats B" is supported when its interval excludes 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def resample_indices(n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """``[resamples, n]`` subject indices drawn with replacement from ``torch.Generator(seed)``: every row and every
    paired difference of one table uses the same draws."""
    if n < 1 or resamples < 1:
        raise ValueError(f"need at least one value and one resample (got n={n}, resamples={resamples})")
    return torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))


def bootstrap(values, level: float = 0.95, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Interval:
    """Percentile-bootstrap interval of the mean of ``values`` (per-subject scores). One value has no spread to
    resample: its interval is (-inf, inf), never a claim."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), not {level}")
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if not torch.isfinite(x).all():
        raise ValueError("bootstrap of non-finite values")
    if len(x) == 1:
        return Interval(float(x[0]), -math.inf, math.inf, level)
    means = x[resample_indices(len(x), resamples, seed)].mean(dim=1)
    alpha = 1 - level
    low, high = torch.quantile(means, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)).tolist()
    return Interval(float(x.mean()), low, high, level)


def paired_difference(a, b, level: float = 0.95, resamples: int = DEFAULT_RESAMPLES,
                      seed: int = DEFAULT_SEED) -> Interval:
    """Interval of mean(a - b) for per-subject scores of two rows on the same subjects (same order)."""
    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    b = torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"paired rows need the same subjects: {len(a)} against {len(b)} scores")
    return bootstrap(a - b, level, resamples, seed)
