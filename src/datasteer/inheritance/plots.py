"""Plots for the active-inheritance report. Each function writes one PNG and returns its path.

matplotlib runs on the Agg backend (`datasteer.plotting`), imported lazily so that the package imports
without it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from datasteer.plotting import pyplot

COLOURS = {"base": "#7f7f7f", "random": "#1f77b4", "active": "#d62728"}
_FALLBACK = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]


def colour(label: str, index: int) -> str:
    return COLOURS.get(label, _FALLBACK[index % len(_FALLBACK)])


def _values(rows: list[dict[str, Any]], column: str) -> list[float]:
    out = []
    for r in rows:
        v = r.get(column)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
            out.append(float(v))
    return out


def metric_distributions(profiles: list[Any], metrics: list[str], path: Path) -> Path:
    """Per metric, one violin (with its median and quartiles) per profile: before/after distributions."""
    plt = pyplot()
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        data = [_values(p.rows, metric) for p in profiles]
        positions = [i for i, d in enumerate(data) if d]
        if positions:
            parts = ax.violinplot([data[i] for i in positions], positions=positions, showmedians=True,
                                  quantiles=[[0.25, 0.75]] * len(positions))
            for body, i in zip(parts["bodies"], positions):
                body.set_facecolor(colour(profiles[i].label, i))
                body.set_alpha(0.45)
        ax.set_xticks(range(len(profiles)), [p.label for p in profiles])
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle("Generation profiles on held-out prompts (violins: distribution; lines: median and quartiles)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def objective_bars(comparison: Any, metrics: list[str], path: Path, n: dict[str, list[int]]) -> Path:
    """Per objective metric, the mean of each profile with a 95% interval of the mean."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics) + 0.8, 3.4), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        row = comparison.row(metric)
        means = [m if m is not None else 0.0 for m in row.means]
        errs = [1.96 * (s or 0.0) / math.sqrt(max(k, 1)) for s, k in zip(row.stds, n[metric])]
        labels = comparison.labels
        ax.bar(range(len(labels)), means, yerr=errs, capsize=5,
               color=[colour(lab, i) for i, lab in enumerate(labels)], alpha=0.8)
        ax.set_xticks(range(len(labels)), labels)
        arrow = "" if row.higher_is_better is None else (" (higher is better)" if row.higher_is_better
                                                         else " (lower is better)")
        ax.set_title(metric + arrow, fontsize=10)
        lo = min(m - e for m, e in zip(means, errs))
        hi = max(m + e for m, e in zip(means, errs))
        pad = 0.15 * (hi - lo or abs(hi) or 1.0)
        ax.set_ylim(max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Targeted metric: mean ± 95% CI of the mean")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def selection_histogram(candidates: list[dict[str, Any]], selections: dict[str, list[dict[str, Any]]],
                        column: str, path: Path) -> Path:
    """The objective over all candidates and over each selection: what the student is trained on."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    pool = _values(candidates, column)
    if pool:
        lo, hi = min(pool), max(pool)
        bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
        ax.hist(pool, bins=bins, density=True, alpha=0.3, color="#7f7f7f", label=f"all candidates ({len(pool)})")
        for i, (label, rows) in enumerate(selections.items()):
            vals = _values(rows, column)
            ax.hist(vals, bins=bins, density=True, histtype="step", linewidth=2, color=colour(label, i),
                    label=f"{label} selection ({len(vals)}), mean {sum(vals) / max(len(vals), 1):.3g}")
    ax.set_xlabel(column)
    ax.set_ylabel("density")
    ax.set_title(f"Training data: {column} of the candidates and of each selection")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_loss(logs: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Training loss per optimizer step for each fine-tuned student."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for i, (label, log) in enumerate(logs.items()):
        steps = [e.get("step", j + 1) for j, e in enumerate(log)]
        ax.plot(steps, [e["loss"] for e in log], marker=".", color=colour(label, i), label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def forest(dimensions: dict[str, list[Any]], path: Path) -> Path:
    """One panel per dimension: each student's change against the base with its 95% interval (a line at 0).
    `dimensions`: student label -> its `Dimension`s (same order for every student)."""
    plt = pyplot()
    students = list(dimensions)
    first = dimensions[students[0]]
    cols = min(4, len(first))
    rows = math.ceil(len(first) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 0.55 * len(students) + 1.6 * rows + 0.4 * rows),
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(first):
            ax.axis("off")
            continue
        for i, label in enumerate(students):
            d = dimensions[label][k]
            if d.delta is None:
                continue
            lo = d.delta - d.low if d.low is not None else 0.0
            hi = d.high - d.delta if d.high is not None else 0.0
            ax.errorbar([d.delta], [i], xerr=[[lo], [hi]], fmt="o", capsize=4, color=colour(label, i + 1))
        ax.axvline(0.0, color="#444444", lw=0.8)
        ax.set_yticks(range(len(students)), students)
        ax.set_ylim(-0.7, len(students) - 0.3)
        ax.set_title(f"{first[k].group}: {first[k].name}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Passive inheritance: each student minus the base, 95% intervals")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
