"""`compare`: profiles side by side, with deltas against the first and paired confidence intervals.

The profiles of one comparison share their held-out prompts, so differences are paired: for
each metric, every prompt's mean value (over its k samples) in profile B minus the same
prompt's value in the baseline profile A. The table reports the difference of means in percent
of A's mean and the paired mean difference with a 95% interval (normal approximation,
mean +- 1.96 * sd / sqrt(n)); an interval that contains 0 means the change is within noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from datasteer.errors import InputError
from datasteer.inheritance.profile import Profile
from datasteer.stats import mean_interval


@dataclass
class PairedDifference:
    n: int
    mean: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


@dataclass
class MetricRow:
    metric: str
    higher_is_better: bool | None
    means: list[float | None]
    stds: list[float | None]
    delta_pct: list[float | None]  # vs the first profile
    paired: list[PairedDifference | None] = field(default_factory=list)  # vs the first profile
    extra: dict[str, Any] = field(default_factory=dict)  # toxicity: EMT and TP per profile


@dataclass
class Comparison:
    labels: list[str]
    rows: list[MetricRow]

    def row(self, metric: str) -> MetricRow:
        return next(r for r in self.rows if r.metric == metric)

    def table(self) -> tuple[list[str], list[list[str]]]:
        """(headers, rows of cells): each profile's mean ± std, then each profile against the first."""
        base = self.labels[0]
        head = ["metric"] + [f"{lab} mean ± std" for lab in self.labels]
        head += [f"{lab} vs {base}" for lab in self.labels[1:]]
        rows = []
        for r in self.rows:
            cells = [r.metric + ("" if r.higher_is_better is None else (" ↑" if r.higher_is_better else " ↓"))]
            cells += [_fmt_mean_std(m, s) for m, s in zip(r.means, r.stds)]
            cells += [_fmt_delta(d, p) for d, p in zip(r.delta_pct[1:], r.paired[1:])]
            rows.append(cells)
        return head, rows

    def to_markdown(self) -> str:
        head, rows = self.table()
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(cells) + " |" for cells in rows]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {"labels": self.labels, "metrics": {
            r.metric: {"higher_is_better": r.higher_is_better, "means": r.means, "stds": r.stds,
                       "delta_pct": r.delta_pct,
                       "paired": [None if p is None else {"n": p.n, "mean": p.mean, "ci95": [p.low, p.high],
                                                          "significant": p.significant} for p in r.paired],
                       **r.extra}
            for r in self.rows}}


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"


def _fmt_mean_std(m: float | None, s: float | None) -> str:
    return "-" if m is None else f"{_fmt(m)} ± {_fmt(s)}"


def _fmt_delta(d: float | None, p: PairedDifference | None) -> str:
    text = "-" if d is None else f"{d:+.1f}%"
    if p is not None:
        text += f" (Δ {_fmt(p.mean)}, 95% CI [{_fmt(p.low)}, {_fmt(p.high)}]{'' if p.significant else ', noise'})"
    return text


def per_prompt_means(profile: Profile, metric: str, id_field: str = "prompt_id") -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for row in profile.rows:
        v = row.get(metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        sums.setdefault(str(row[id_field]), []).append(float(v))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def paired_difference(a: dict[str, float], b: dict[str, float]) -> PairedDifference | None:
    """Mean of b - a over the prompts both have, with a 95% normal-approximation interval."""
    common = sorted(a.keys() & b.keys())
    if len(common) < 2:
        return None
    mean, low, high = mean_interval([b[k] - a[k] for k in common])  # type: ignore[misc]
    return PairedDifference(n=len(common), mean=mean, low=low, high=high)


def compare(profiles: list[Profile], metrics: list[str] | None = None) -> Comparison:
    """Compare profiles metric by metric, each against the first."""
    if len(profiles) < 2:
        raise InputError("compare needs at least two profiles")
    labels = [p.label for p in profiles]
    if len(set(labels)) != len(labels):
        labels = [f"{p.label}@{p.path.name}" if labels.count(p.label) > 1 else p.label for p in profiles]
    shared = [m for m in profiles[0].metrics if all(m in p.metrics for p in profiles[1:])]
    if metrics:
        unknown = [m for m in metrics if m not in shared]
        if unknown:
            raise InputError(f"metric(s) {unknown} are not in every profile; shared metrics: {', '.join(shared)}")
        shared = metrics
    if not shared:
        raise InputError("the profiles share no metric; profile them with the same --metrics")
    rows = []
    for metric in shared:
        entries = [p.metrics[metric] for p in profiles]
        means = [e.get("mean") for e in entries]
        base = means[0]
        deltas = [None if m is None or base is None or base == 0 else 100.0 * (m - base) / abs(base) for m in means]
        base_prompts = per_prompt_means(profiles[0], metric)
        paired = [None] + [paired_difference(base_prompts, per_prompt_means(p, metric)) for p in profiles[1:]]
        extra = {}
        if all("toxicity" in e for e in entries):
            extra["toxicity"] = [e["toxicity"] for e in entries]
        rows.append(MetricRow(metric=metric, higher_is_better=entries[0].get("higher_is_better"), means=means,
                              stds=[e.get("std") for e in entries], delta_pct=deltas, paired=paired, extra=extra))
    return Comparison(labels=labels, rows=rows)
