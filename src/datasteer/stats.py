"""Summary statistics shared by scoring, selection and profiles."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def column_stats(values: list[float | None]) -> dict[str, Any]:
    """count, missing, mean, std (sample), min, quantiles and max of a column (missing values left out)."""
    present = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    stats: dict[str, Any] = {"count": int(present.size), "missing": len(values) - int(present.size)}
    if present.size:
        stats.update(mean=float(present.mean()), std=float(present.std(ddof=1)) if present.size > 1 else 0.0,
                     min=float(present.min()), max=float(present.max()))
        for q, v in zip(QUANTILES, np.quantile(present, QUANTILES)):
            stats[f"p{int(q * 100)}"] = float(v)
    return stats
