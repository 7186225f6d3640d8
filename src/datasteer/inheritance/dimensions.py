"""What changed between a base model and a student, dimension by dimension, each with a 95% interval and a verdict.

A dimension is one number of one profile: a text statistic of the held-out answers, Expected Maximum Toxicity or
Toxicity Probability, a probe's headline number (BBQ accuracy and bias scores, StereoSet SS/LM/ICAT, CrowS-Pairs,
MCQA accuracy and ECE, the model-as-a-judge preferences), or the student's win rate against the base as judged
pairwise. Every interval is paired over the units both models share:

- text statistics: per held-out prompt (the mean over its samples), mean difference +- 1.96 sd / sqrt(n);
- toxicity: per prompt, the maximum over its samples (EMT) and whether it reaches 0.5 (TP), paired the same way;
- probes: a paired bootstrap over items (the same resampled items for both models; `resamples` draws, seeded),
  each draw recomputing the probe's own summary, because bias scores, ICAT and ECE are not means of per-item values;
  the interval is the 2.5th to 97.5th percentile of the differences;
- win rate against the base: each pair scores 1, 0.5 (tie) or 0, mean +- 1.96 sd / sqrt(n), against 0.5.

`delta`, `low` and `high` are the change and its interval (a win rate's is its distance from 0.5). Verdict:
"higher" or "lower" when the interval leaves 0, "no change" otherwise; where a
dimension has a better direction (accuracy up, ECE down) the verdict says "better" or "worse" too.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datasteer.inheritance.compare import _fmt, compare
from datasteer.inheritance.profile import PROBES, Profile
from datasteer.probes.base import build_probe
from datasteer.runs import derive_seed
from datasteer.stats import mean_interval


@dataclass
class Dimension:
    group: str  # text, toxicity, a benchmark name, judge, preference
    name: str
    base: float | None
    value: float | None
    delta: float | None
    low: float | None
    high: float | None
    n: int
    method: str
    higher_is_better: bool | None = None

    @property
    def verdict(self) -> str:
        if self.low is None or self.high is None or self.delta is None:
            return "n/a"
        if self.low <= 0.0 <= self.high:
            return "no change"
        up = self.low > 0.0
        text = "higher" if up else "lower"
        if self.higher_is_better is not None:
            text += " (better)" if up == self.higher_is_better else " (worse)"
        return text

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


def text_dimensions(base: Profile, student: Profile) -> list[Dimension]:
    """Every metric the two text profiles share, paired over held-out prompts."""
    comparison = compare([base, student])
    out = []
    for row in comparison.rows:
        paired = row.paired[1]
        out.append(Dimension("text", row.metric, row.means[0], row.means[1], None if paired is None else paired.mean,
                             None if paired is None else paired.low, None if paired is None else paired.high,
                             0 if paired is None else paired.n, "paired over prompts"))
        # no better/worse here: a metric's direction is a selection objective's, not a verdict on what a student
        # inherited (longer or plainer answers are not better in themselves)
    return out


def _toxicity_column(profile: Profile) -> str | None:
    return next((m for m, e in profile.metrics.items() if "toxicity" in e), None)


def _prompt_maxima(profile: Profile, column: str) -> dict[str, float]:
    maxima: dict[str, float] = {}
    for row in profile.rows:
        v = row.get(column)
        if isinstance(v, (int, float)) and math.isfinite(v):
            key = str(row["prompt_id"])
            maxima[key] = max(maxima.get(key, -math.inf), float(v))
    return maxima


def toxicity_dimensions(base: Profile, student: Profile, threshold: float = 0.5) -> list[Dimension]:
    """Expected Maximum Toxicity and Toxicity Probability, paired over prompts."""
    column = _toxicity_column(base)
    if column is None or column not in student.metrics:
        return []
    a, b = _prompt_maxima(base, column), _prompt_maxima(student, column)
    common = sorted(a.keys() & b.keys())
    out = []
    for name, f in (("Expected Maximum Toxicity", lambda x: x), ("Toxicity Probability",
                                                                  lambda x: float(x >= threshold))):
        xs, ys = [f(a[k]) for k in common], [f(b[k]) for k in common]
        found = mean_interval([y - x for x, y in zip(xs, ys)])
        mean_x = sum(xs) / len(xs) if xs else None
        mean_y = sum(ys) / len(ys) if ys else None
        out.append(Dimension("toxicity", f"{name} ({column})", mean_x, mean_y, *(found or (None, None, None)),
                             n=len(common), method="paired over prompts", higher_is_better=False))
    return out


def _rows(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def probe_dimensions(base_dir: Path, student_dir: Path, benchmarks: dict[str, Any], resamples: int,
                     seed: int, group: str | None = None) -> list[Dimension]:
    """Each benchmark's headline numbers (the probe's `headline`), with paired bootstrap intervals over items.
    `base_dir`/`student_dir` are probe runs; `benchmarks` maps name -> BenchmarkSpec (the probe and its options)."""
    summary_b = json.loads((base_dir / "summary.json").read_text(encoding="utf-8"))
    summary_s = json.loads((student_dir / "summary.json").read_text(encoding="utf-8"))
    out = []
    for name, spec in benchmarks.items():
        if name not in summary_b or name not in summary_s:
            continue
        probe = build_probe(summary_b[name]["probe"], dict(spec.options))
        headline = getattr(probe, "headline", None)
        if headline is None:
            continue
        rows_b = {r["item_id"]: r for r in _rows(base_dir / f"{name}.jsonl")}
        rows_s = {r["item_id"]: r for r in _rows(student_dir / f"{name}.jsonl")}
        common = [i for i in rows_b if i in rows_s]
        xs, ys = [rows_b[i] for i in common], [rows_s[i] for i in common]
        point_b, point_s = headline(probe.summarize(xs)), headline(probe.summarize(ys))
        rng = np.random.default_rng(derive_seed(seed, "bootstrap", name))
        draws: dict[str, list[float]] = {k: [] for k in point_b}
        for _ in range(resamples):
            idx = rng.integers(0, len(common), len(common))
            hb, hs = headline(probe.summarize([xs[i] for i in idx])), headline(probe.summarize([ys[i] for i in idx]))
            for k in draws:
                if hb[k][0] is not None and hs[k][0] is not None:
                    draws[k].append(hs[k][0] - hb[k][0])
        for k, (vb, better) in point_b.items():
            vs = point_s[k][0]
            d = draws[k]
            low, high = (float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))) if len(d) >= 2 else (None, None)
            out.append(Dimension(group or name, k, vb, vs, None if vb is None or vs is None else vs - vb, low, high,
                                 len(common), f"paired bootstrap over items ({resamples} draws)", better))
    return out


def win_rate_dimension(summary: dict[str, Any]) -> Dimension:
    """A student's win rate against the base (a `pairwise` summary), against 0.5."""
    rate = summary["win_rate"]
    low, high = (rate["ci95"][0] - 0.5, rate["ci95"][1] - 0.5) if rate["ci95"] else (None, None)
    return Dimension("preference", f"win rate vs base (judge {summary['judge']})", 0.5, rate["mean"],
                     rate["mean"] - 0.5 if rate["mean"] is not None else None, low, high, rate["n"],
                     "pairs scored 1 / 0.5 / 0 against 0.5, normal interval", True)


def profile_probe_dir(profile: Profile) -> Path:
    return profile.path / PROBES


def _cell(d: Dimension) -> str:
    if d.delta is None:
        return f"{_fmt(d.value)} (n/a)"
    ci = "" if d.low is None else f", [{_fmt(d.low)}, {_fmt(d.high)}]"
    return f"{_fmt(d.value)} (Δ {d.delta:+.4g}{ci}): {d.verdict}"


def markdown_table(dimensions: dict[str, list[Dimension]]) -> list[str]:
    """The lines of a Markdown table: one row per dimension, the base's value, then each model's value with its
    change, interval and verdict. `dimensions`: model label -> its Dimensions (the same ones for every label)."""
    labels = list(dimensions)
    head = ["group", "dimension", "base", *labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, d in enumerate(dimensions[labels[0]]):
        cells = [d.group, d.name, _fmt(d.base)] + [_cell(dimensions[label][k]) for label in labels]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
