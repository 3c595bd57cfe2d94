"""Confidence intervals over seeds: of a mean (Student's t), and of a difference of means (Welch)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided confidence interval at ``LEVEL``."""

    estimate: float
    low: float
    high: float

    @property
    def defined(self) -> bool:  # False with one value, or two samples without any spread
        return math.isfinite(self.low) and math.isfinite(self.high)

    def contains(self, value: float) -> bool:
        return self.defined and self.low <= value <= self.high

    @property
    def excludes_zero(self) -> bool:
        return self.defined and not self.contains(0.0)

    def scaled(self, factor: float) -> Interval:
        return Interval(self.estimate * factor, self.low * factor, self.high * factor)


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    r"""Mean over seeds with its t interval :math:`\bar x \pm t_{n-1} s / \sqrt n` (NaN for n < 2)."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return Interval(float(x.mean()), math.nan, math.nan)
    if np.ptp(x) == 0:  # equal values (their float mean and std need not be exact)
        return Interval(float(x[0]), float(x[0]), float(x[0]))
    ci = stats.ttest_1samp(x, 0.0).confidence_interval(level)
    return Interval(float(x.mean()), float(ci.low), float(ci.high))


def difference_interval(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Interval:
    r"""``mean(a) − mean(b)`` with Welch's t interval (unequal variances, Welch–Satterthwaite
    degrees of freedom); NaN bounds when either side has a single seed or neither has spread."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    estimate = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2 or (np.ptp(x) == 0 and np.ptp(y) == 0):
        return Interval(estimate, math.nan, math.nan)
    ci = stats.ttest_ind(x, y, equal_var=False).confidence_interval(level)
    return Interval(estimate, float(ci.low), float(ci.high))
