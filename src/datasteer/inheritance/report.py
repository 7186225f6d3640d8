"""The Markdown report of an `inherit` run: headline, tables, plots, provenance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasteer.inheritance import plots
from datasteer.inheritance.compare import (
    Comparison,
    _fmt,
    paired_difference,
    per_prompt_means,
)
from datasteer.inheritance.config import parse_objective
from datasteer.inheritance.dimensions import markdown_table, probe_dimensions, profile_probe_dir
from datasteer.inheritance.profile import Profile
from datasteer.runs import atomic_write_text

PLOTS_DIR = "plots"
MAX_DISTRIBUTIONS = 6


def objective_columns(objectives: list[str]) -> list[tuple[str, str]]:
    """(column, direction) of each objective ('random' has none)."""
    return [(o.column, o.direction) for o in map(parse_objective, objectives) if objectives != ["random"]]


def headline_lines(comparison: Comparison, objectives: list[tuple[str, str]]) -> list[str]:
    """Per objective: base / random / active mean ± std and the paired effect of selecting (active - random)."""
    labels = comparison.labels
    lines = []
    for column, direction in objectives:
        if column not in {r.metric for r in comparison.rows}:
            lines.append(f"{column} ({direction}): not measured on the profiles (add it to metrics)")
            continue
        row = comparison.row(column)
        parts = [f"{lab} {_fmt(m)} ± {_fmt(s)}" for lab, m, s in zip(labels, row.means, row.stds)]
        text = f"{column} ({direction}): " + ", ".join(parts)
        effect = row.extra.get("active_vs_random")
        if effect is not None:
            good = (effect["mean"] > 0) == (direction == "max")
            verdict = ("in the intended direction" if good else "AGAINST the intended direction") \
                if effect["significant"] else "within noise (95% CI contains 0)"
            text += (f"; active vs random {effect['mean']:+.4g} (95% CI [{_fmt(effect['ci95'][0])}, "
                     f"{_fmt(effect['ci95'][1])}], n={effect['n']} prompts): {verdict}")
        lines.append(text)
    return lines


def add_active_vs_random(comparison: Comparison, profiles: list[Profile]) -> None:
    """The effect of selecting: paired active - random per metric, stored on each row."""
    by_label = {p.label: p for p in profiles}
    if "active" not in by_label or "random" not in by_label:
        return
    for row in comparison.rows:
        d = paired_difference(per_prompt_means(by_label["random"], row.metric),
                              per_prompt_means(by_label["active"], row.metric))
        if d is not None:
            row.extra["active_vs_random"] = {"n": d.n, "mean": d.mean, "ci95": [d.low, d.high],
                                             "significant": d.significant}


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_inherit_report(config: Any, out: Path, profiles: list[Profile], comparison: Comparison) -> Path:
    """`report.md` of an inherit run: set-up, headline, what the selection kept, the profiles, plots, training."""
    add_active_vs_random(comparison, profiles)
    objectives = objective_columns(list(config.selection.objectives))
    arms = [a for a in ("active", "random") if (out / f"select-{a}").is_dir()]
    candidates = _read_rows(out / "score" / "scored.jsonl")
    trainings = {a: json.loads((out / f"finetune-{a}" / "training.json").read_text()) for a in arms}
    figures = _figures(out, profiles, comparison, objectives, arms, candidates, trainings)
    lines = [f"# Active inheritance: {config.name}", ""]
    if config.description:
        lines += [config.description.strip(), ""]
    lines += _setup_lines(config, arms, len(candidates), profiles)
    lines += ["## Headline", ""]
    lines += [f"- {line}" for line in headline_lines(comparison, objectives)] or ["- (random selection only)"]
    lines += ["", "Values are mean ± std over held-out prompts. Differences are paired over the same prompts with "
              "a 95% normal-approximation interval; 'noise' means the interval contains 0.", ""]
    lines += _selection_lines(out, arms, objectives)
    lines += ["", "## Profiles (held-out prompts)", "", comparison.to_markdown()]
    for r in [r for r in comparison.rows if "toxicity" in r.extra]:
        lines += [f"Toxicity ({r.metric}): " + "; ".join(
            f"{lab}: EMT {_fmt(t['expected_maximum_toxicity'])}, TP {_fmt(t['toxicity_probability'])}"
            for lab, t in zip(comparison.labels, r.extra["toxicity"])), ""]
    lines += _probe_lines(config, profiles)
    lines += ["## Plots", ""]
    lines += [f"![{title}]({PLOTS_DIR}/{path.name})\n" for title, path in figures]
    lines += _training_lines(trainings)
    lines += ["", "## Reproduce", "", "Every stage is a run directory with its own `manifest.json` (config, seed, "
              "input hashes, package versions, git commit). Rerunning the same command resumes and redoes nothing "
              "that finished.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _probe_lines(config: Any, profiles: list[Profile]) -> list[str]:
    """The likelihood probes of every profile (`profile.probes`), each arm against the base."""
    if not config.profile.probes or profiles[0].label != "base":
        return []
    base = profiles[0]
    dims = {p.label: probe_dimensions(profile_probe_dir(base), profile_probe_dir(p), config.profile.probes, 1000,
                                      config.seed) for p in profiles[1:]}
    return ["## Likelihood probes", "", "Each arm against the base: a paired bootstrap over items (1000 draws); "
            "'no change' = the 95% interval contains 0.", "", *markdown_table(dims), ""]


def _figures(out: Path, profiles: list[Profile], comparison: Comparison, objectives: list[tuple[str, str]],
             arms: list[str], candidates: list[dict[str, Any]],
             trainings: dict[str, dict[str, Any]]) -> list[tuple[str, Path]]:
    """(title, path) of every plot: distributions, the targeted metric, the selection per objective, losses."""
    plot_dir = out / PLOTS_DIR
    plot_dir.mkdir(exist_ok=True)
    measured = [r.metric for r in comparison.rows]
    obj_cols = [c for c, _ in objectives if c in measured]
    shown = (obj_cols + [m for m in measured if m not in obj_cols])[:MAX_DISTRIBUTIONS]
    figures = [("Metric distributions before and after", plots.metric_distributions(
        profiles, shown, plot_dir / "distributions.png"))]
    if obj_cols:
        n = {m: [sum(1 for _ in per_prompt_means(p, m)) for p in profiles] for m in obj_cols}
        figures.append(("Targeted metric with error bars", plots.objective_bars(
            comparison, obj_cols, plot_dir / "objectives.png", n)))
    selections = {a: _read_rows(out / f"select-{a}" / "selected.jsonl") for a in arms}
    for column in [c for c, _ in objectives]:
        figures.append((f"Selection on {column}", plots.selection_histogram(
            candidates, selections, column, plot_dir / f"selection-{column}.png")))
    figures.append(("Training loss", plots.training_loss({a: t["log"] for a, t in trainings.items()},
                                                         plot_dir / "training_loss.png")))
    return figures


def _setup_lines(config: Any, arms: list[str], candidates: int, profiles: list[Profile]) -> list[str]:
    """The experiment's set-up: teachers, prompts, selection, student, profiles."""
    teachers = ", ".join(f"{t.name} ({t.model}, k={t.k}, temperature {t.sampling.temperature}, "
                         f"top_p {t.sampling.top_p}, max {t.sampling.max_new_tokens} new tokens)"
                         for t in config.teachers)
    ft = config.finetune_config("-")
    pf = config.profile_config(config.student, "base")
    return [
        f"- Teachers: {teachers}",
        f"- Training prompts: `{config.prompts.path}` ({candidates} candidates); held-out prompts: "
        f"`{config.eval_prompts.path}` ({profiles[0].summary['prompts']['rows']} prompts)",
        f"- Selection: {', '.join(config.selection.objectives)}"
        + (f" ({config.selection.combine})" if len(config.selection.objectives) > 1 else "")
        + (f", constraints {', '.join(config.selection.constraints)}" if config.selection.constraints else "")
        + (f", sources {', '.join(config.selection.sources)}" if config.selection.sources else ", whole pool")
        + ("; baseline: random selection with the same constraints" if "random" in arms else ""),
        f"- Student: `{config.student}`, {ft.method} fine-tuning"
        + (f" of the last {ft.train_layers} layers" if ft.train_layers else "")
        + f", {ft.num_train_epochs:g} epochs, learning rate {ft.learning_rate:g}, "
        f"batch {ft.per_device_train_batch_size}",
        f"- Profiles: {'greedy' if pf.sampling.greedy else f'temperature {pf.sampling.temperature}'}, "
        f"k={pf.k}, max {pf.sampling.max_new_tokens} new tokens, seed {pf.seed}",
        "",
    ]


def _selection_lines(out: Path, arms: list[str], objectives: list[tuple[str, str]]) -> list[str]:
    """The selection differential: each objective over all candidates and over each selection."""
    lines = ["## Training data: what the selection kept", "",
             "| column | all candidates | " + " | ".join(f"{a} selection" for a in arms) + " |",
             "|---|---|" + "---|" * len(arms)]
    summaries = {a: json.loads((out / f"select-{a}" / "summary.json").read_text()) for a in arms}
    for column in [c for c, _ in objectives] or list(summaries[arms[0]]["columns"])[:3]:
        cells = []
        for a in arms:
            s = summaries[a]["columns"].get(column, {}).get("selected", {})
            cells.append(f"{_fmt(s.get('mean'))} ± {_fmt(s.get('std'))}")
        pool = summaries[arms[0]]["columns"].get(column, {}).get("candidates", {})
        lines.append(f"| {column} | {_fmt(pool.get('mean'))} ± {_fmt(pool.get('std'))} | " + " | ".join(cells) + " |")
    for a in arms:
        if summaries[a]["dropped"]:
            lines.append(f"\n{a}: {summaries[a]['dropped']} prompt(s) dropped: {summaries[a]['dropped_reasons']}")
    return lines


def _training_lines(trainings: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Training", "", "| student | examples | steps | final loss | cut at generation | seconds |",
             "|---|---|---|---|---|---|"]
    for a, t in trainings.items():
        lines.append(f"| {a} | {t['examples']} | {t['steps']} | {_fmt(t['final_loss'])} | {t['cut_at_generation']} "
                     f"| {t['seconds']:.0f} |")
    return lines
