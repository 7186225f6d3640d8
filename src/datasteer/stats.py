"""Summary statistics shared by scoring, selection and profiles."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what a scored column holds when it has a value. None, NaN, inf, text
    and booleans are missing values everywhere (scoring, selection, summaries)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def column_stats(values: list[float | None]) -> dict[str, Any]:
    """count, missing, mean, std (sample), min, quantiles and max of a column. Missing values (None, NaN) are
    left out, and so are infinities, counted apart (`non_finite`), so every statistic is a finite number."""
    present = np.array([v for v in values if is_number(v)], dtype=np.float64)
    stats: dict[str, Any] = {"count": int(present.size), "missing": len(values) - int(present.size)}
    infinite = sum(1 for v in values if isinstance(v, float) and math.isinf(v))
    if infinite:
        stats["non_finite"] = infinite
    if present.size:
        stats.update(mean=float(present.mean()), std=float(present.std(ddof=1)) if present.size > 1 else 0.0,
                     min=float(present.min()), max=float(present.max()))
        for q, v in zip(QUANTILES, np.quantile(present, QUANTILES)):
            stats[f"p{int(q * 100)}"] = float(v)
    return stats


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def mean_interval(values: list[float]) -> tuple[float, float, float] | None:
    """(mean, low, high): the mean of `values` with a 95% normal-approximation interval, mean +- 1.96 * sd / sqrt(n)
    (sample sd). None below two values. Used for paired differences and win rates (scores 1, 0.5, 0)."""
    n = len(values)
    if n < 2:
        return None
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = Z95 * sd / math.sqrt(n)
    return mean, mean - half, mean + half
