"""Calibration of multiple-choice answers: option probabilities, top-label ECE on equal-mass bins, reliability.

As the LLM-See-LLM-Do profiling toolkit measures it: each option's probability is the softmax over the options'
scores (mean token log-likelihoods by default); the model's confidence is its top option's probability and an
answer is correct when that option is the labelled one. Expected calibration error is top-label, with equal-mass
bins, L1, no debiasing: `calibration.get_ece_em(probs, labels, num_bins=...)` of the `uncertainty-calibration`
package (Kumar et al., 2019), which the tests check these numbers against:

- sort the confidences, split them into `num_bins` nearly equal parts (`numpy.array_split`; fewer bins when there
  are fewer items), put each boundary half-way between neighbouring parts, the last at 1.0, duplicates dropped;
- a confidence c falls in the first bin whose upper boundary is >= c;
- ECE = sum over bins of (bin size / n) x |mean confidence - accuracy| in the bin.

With one bin, ECE = |mean confidence - accuracy|.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def softmax(scores: Sequence[float]) -> list[float]:
    x = np.asarray(scores, dtype=np.float64)
    e = np.exp(x - x.max())
    return (e / e.sum()).tolist()


def equal_mass_edges(confidences: Sequence[float], num_bins: int) -> list[float]:
    """Upper boundaries of the equal-mass bins (the last is 1.0)."""
    ordered = sorted(confidences)
    num_bins = min(num_bins, len(ordered))
    parts = np.array_split(np.asarray(ordered, dtype=np.float64), num_bins)
    edges = [(parts[i][-1] + parts[i + 1][0]) / 2.0 for i in range(num_bins - 1)]
    edges.append(1.0)
    return sorted(set(float(e) for e in edges))


def reliability_bins(confidences: Sequence[float], correct: Sequence[bool | int], num_bins: int) -> list[dict[str, Any]]:
    """Per equal-mass bin: items, mean confidence, accuracy, its items' lowest and highest confidence, and its
    boundaries."""
    if not confidences:
        return []
    conf = np.asarray(confidences, dtype=np.float64)
    hits = np.asarray(correct, dtype=np.float64)
    edges = equal_mass_edges(conf.tolist(), num_bins)
    index = np.searchsorted(np.asarray(edges), conf, side="left")
    bins = []
    for b in range(len(edges) + 1):  # a confidence above 1.0 (never, for probabilities) would land past the last
        members = index == b
        if not members.any():
            continue
        bins.append({"items": int(members.sum()), "confidence": float(conf[members].mean()),
                     "accuracy": float(hits[members].mean()), "min": float(conf[members].min()),
                     "max": float(conf[members].max()),
                     "lower": float(edges[b - 1]) if b > 0 else 0.0, "upper": float(edges[min(b, len(edges) - 1)])})
    return bins


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool | int], num_bins: int) -> float:
    """Top-label ECE with equal-mass bins (L1); NaN for no items."""
    n = len(confidences)
    if n == 0:
        return math.nan
    return float(sum(b["items"] / n * abs(b["confidence"] - b["accuracy"])
                     for b in reliability_bins(confidences, correct, num_bins)))


def reliability_png(bins: Sequence[dict[str, Any]], title: str) -> bytes:
    """A reliability diagram as PNG bytes: accuracy against mean confidence per equal-mass bin, the diagonal, bin
    sizes."""
    import io

    from datasteer.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    if bins:
        xs = [b["confidence"] for b in bins]
        ys = [b["accuracy"] for b in bins]
        widths = [max(b["max"] - b["min"], 0.005) for b in bins]  # each bar spans its items' confidences
        lefts = [b["min"] for b in bins]
        ax.bar(lefts, ys, width=widths, align="edge", alpha=0.35, edgecolor="tab:blue", label="accuracy per bin")
        ax.plot(xs, ys, marker="o", color="tab:blue", label="(mean confidence, accuracy)")
        for b in bins:
            ax.annotate(str(b["items"]), (b["confidence"], b["accuracy"]), textcoords="offset points",
                        xytext=(0, 5), ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence (top option's probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
