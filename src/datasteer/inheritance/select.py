"""`select`: keep one candidate per prompt, by objectives over scored columns or at random.

Rules, in the order they apply to the candidates of one prompt:

1. source filter: `sources` keeps only candidates of those teachers (single-source selection);
   no filter selects from the whole pool across teachers (multi-source selection).
2. constraints (`length_words>=50`, `toxicity_profanity<0.5`): a candidate that fails one, or whose
   constrained column is missing, is not eligible.
3. missing objective values: a candidate with no value (null/NaN) for an objective is not
   eligible either; it cannot be ranked.
4. ranking among the eligible candidates:
   - one objective: its value, maximised or minimised;
   - `combine="weighted"`: the weighted sum of per-prompt standardised values, z = (x - mean) / std over
     the prompt's eligible candidates (z = 0 where they all agree), sign-flipped for `min`;
   - `combine="lexicographic"`: the first objective decides, the next ones break its ties;
   - `random`: a uniform draw seeded by (seed, prompt id), so the baseline is reproducible and
     independent of the order of prompts.
   Exact ties go to the candidate that comes first in the input (deterministic).
5. a prompt with no eligible candidate is dropped and reported with its reason, never kept.

Every selected row keeps its columns and gains `selection`: the objective, the winning score,
the margin over the runner-up (in the same units as the score; None with a single eligible
candidate) and how many candidates were eligible.

Files: `selected.jsonl`, `dropped.jsonl` (only when a prompt was dropped), `summary.json` and a dataset card,
`README.md`, with both rows files' explicit schemas.
"""

from __future__ import annotations

import difflib
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasteer.errors import InputError
from datasteer.inheritance.config import Constraint, Objective, SelectConfig, parse_constraint, parse_objective
from datasteer.io import read_rows
from datasteer.rows import load_rows, rows_file, write_card, write_rows
from datasteer.runs import Run, derive_seed, file_input
from datasteer.stats import column_stats, is_number

SELECTED, DROPPED = "selected", "dropped"
SELECTED_FILE = rows_file(SELECTED)
DROPPED_FILE = rows_file(DROPPED)  # written only when a prompt was dropped: an empty file is no dataset
SUMMARY_FILE = "summary.json"

def is_random(config: SelectConfig) -> bool:
    return config.objectives == ["random"]


def _value(row: dict[str, Any], column: str) -> float | None:
    v = row.get(column)
    return float(v) if is_number(v) else None  # NaN and inf are missing: they cannot be ranked


def did_you_mean(name: str, known: list[str]) -> str:
    """"did you mean 'x'? " for the closest known name, or ""."""
    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def _check_columns(rows: list[dict[str, Any]], config: SelectConfig, columns: list[str]) -> None:
    where = config.input
    for need in (config.id_field, config.text_field):
        missing = next((i for i, r in enumerate(rows, 1) if need not in r), None)
        if missing is not None:
            raise InputError(f"{where}: row {missing} has no '{need}' column, which selection needs; "
                             f"pass --{'id' if need == config.id_field else 'text'}-field to name it")
    if config.sources and "source" not in rows[0]:
        raise InputError(f"{where}: rows have no 'source' column, so --source cannot filter teachers")
    numeric = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for column in columns:
        if not any(column in r for r in rows):
            raise InputError(f"{where}: no column '{column}' to select on; {did_you_mean(column, numeric)}numeric "
                             f"columns: {', '.join(numeric) or 'none'} (score it first: datasteer score ... --metrics "
                             f"{column})")
        bad = next((i for i, r in enumerate(rows, 1) if r.get(column) is not None
                    and (isinstance(r[column], bool) or not isinstance(r[column], (int, float)))), None)
        if bad is not None:
            raise InputError(f"{where}: row {bad}: '{column}' is {type(rows[bad - 1][column]).__name__}, "
                             "not a number; select on a numeric (scored) column")


@dataclass
class Selection:
    """The outcome of selection over a list of rows (pure data; `select` writes it to disk)."""

    selected: list[dict[str, Any]]
    dropped: list[dict[str, Any]]  # {prompt_id, reason, candidates}
    candidates: int  # rows considered after the source filter
    ineligible: Counter = field(default_factory=Counter)  # reason -> candidates not eligible


def select_rows(rows: list[dict[str, Any]], config: SelectConfig) -> Selection:
    """Apply the selection rules of this module to `rows` (no I/O)."""
    objectives = [] if is_random(config) else [parse_objective(s) for s in config.objectives]
    constraints = [parse_constraint(s) for s in config.constraints]
    if not rows:
        raise InputError(f"{config.input} has no rows to select from")
    _check_columns(rows, config, [o.column for o in objectives] + [c.column for c in constraints])

    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if config.sources and row.get("source") not in config.sources:
            continue
        groups.setdefault(str(row[config.id_field]), []).append(row)
    if config.sources and not groups:
        found = sorted({str(r.get("source")) for r in rows})
        raise InputError(f"{config.input}: no candidates from source(s) {', '.join(config.sources)}; "
                         f"sources in the file: {', '.join(found)}")

    selection = Selection(selected=[], dropped=[], candidates=sum(len(g) for g in groups.values()))
    label = "random" if not objectives else (
        str(objectives[0]) if len(objectives) == 1 else f"{config.combine}({', '.join(map(str, objectives))})")
    for prompt_id, cands in groups.items():
        eligible = []
        for row in cands:
            failed = next((c for c in constraints if not c.holds(_value(row, c.column))), None)
            if failed is not None:
                selection.ineligible[f"constraint {failed}"] += 1
                continue
            missing = next((o for o in objectives if _value(row, o.column) is None), None)
            if missing is not None:
                selection.ineligible[f"missing {missing.column}"] += 1
                continue
            eligible.append(row)
        if not eligible:
            reasons = sorted({_why_ineligible(r, constraints, objectives) for r in cands})
            selection.dropped.append({"prompt_id": prompt_id, "reason": "; ".join(reasons),
                                      "candidates": len(cands)})
            continue
        winner, score, margin = _rank(eligible, objectives, config, prompt_id)
        info: dict[str, Any] = {"objective": label, "score": score, "margin": margin, "eligible": len(eligible),
                                "candidates": len(cands)}
        if objectives and len(objectives) > 1:
            info["values"] = {o.column: _value(winner, o.column) for o in objectives}
        selection.selected.append({**winner, "selection": info})
    return selection


def _why_ineligible(row: dict[str, Any], constraints: list[Constraint], objectives: list[Objective]) -> str:
    failed = next((c for c in constraints if not c.holds(_value(row, c.column))), None)
    if failed is not None:
        return f"all candidates fail {failed}" if _value(row, failed.column) is not None \
            else f"{failed.column} missing"
    missing = next(o for o in objectives if _value(row, o.column) is None)
    return f"{missing.column} missing"


def _rank(eligible: list[dict[str, Any]], objectives: list[Objective], config: SelectConfig,
          prompt_id: str) -> tuple[dict[str, Any], float | None, float | None]:
    """(winner, its score, margin over the runner-up) for one prompt's eligible candidates."""
    if not objectives:
        rng = random.Random(derive_seed(config.seed, "random-selection", prompt_id))
        return eligible[rng.randrange(len(eligible))], None, None
    if len(objectives) == 1 or config.combine == "weighted":
        keys = _weighted_keys(eligible, objectives)
        # max() keeps the first of equal keys: exact ties go to the earliest candidate in the input.
        best = max(range(len(eligible)), key=lambda i: keys[i])
        rest = [keys[i] for i in range(len(eligible)) if i != best]
        margin = keys[best] - max(rest) if rest else None
        score = keys[best] * objectives[0].sign if len(objectives) == 1 else keys[best]
        return eligible[best], score, margin
    # lexicographic: tuples of signed values compare objective by objective
    tuples = [tuple(o.sign * _value(r, o.column) for o in objectives) for r in eligible]  # type: ignore[operator]
    best = max(range(len(eligible)), key=lambda i: tuples[i])
    others = [tuples[i] for i in range(len(eligible)) if i != best]
    margin = None
    if others:
        runner = max(others)
        margin = next((a - b for a, b in zip(tuples[best], runner) if a != b), 0.0)
    return eligible[best], _value(eligible[best], objectives[0].column), margin


def _weighted_keys(eligible: list[dict[str, Any]], objectives: list[Objective]) -> list[float]:
    """Signed values for one objective; the weighted sum of per-prompt z-scores for several."""
    if len(objectives) == 1:
        o = objectives[0]
        return [o.sign * _value(r, o.column) for r in eligible]  # type: ignore[operator]
    keys = [0.0] * len(eligible)
    for o in objectives:
        xs = [_value(r, o.column) for r in eligible]
        # z-scores do not change with the scale, and values near the float limit (1e308) would overflow the sums
        scale = max(abs(x) for x in xs) or 1.0  # type: ignore[arg-type]
        xs = [x / scale for x in xs]  # type: ignore[operator]
        mean = sum(xs) / len(xs)  # type: ignore[arg-type]
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))  # type: ignore[operator]
        for i, x in enumerate(xs):
            z = (x - mean) / std if std > 0 else 0.0  # type: ignore[operator]
            keys[i] += o.weight * o.sign * z
    return keys


@dataclass
class SelectResult:
    run_dir: Path
    selected_path: Path
    selected: int
    dropped: int
    summary: dict[str, Any]

    @classmethod
    def load(cls, run: Run) -> SelectResult:
        """The result of a finished select run, read back from its directory."""
        summary = json.loads((run.path / SUMMARY_FILE).read_text(encoding="utf-8"))
        return cls(run_dir=run.path, selected_path=run.path / SELECTED_FILE, selected=summary["selected"],
                   dropped=summary["dropped"], summary=summary)

    def dataset(self, **load_kwargs: Any) -> Any:
        """The selected rows as a `datasets.Dataset` with their explicit features (`datasteer.rows.load_rows`)."""
        return load_rows(self.selected_path, **load_kwargs)


def selection_summary(rows: list[dict[str, Any]], selection: Selection, config: SelectConfig) -> dict[str, Any]:
    """What the selection did to every numeric column: all candidates vs the selected rows."""
    columns = [o.column for o in ([] if is_random(config) else map(parse_objective, config.objectives))]
    columns += [c for c in config.report_columns if c not in columns]
    pool = [r for r in rows if not config.sources or r.get("source") in config.sources]
    shift = {}
    for column in columns:
        if not any(column in r for r in pool):
            continue
        before = column_stats([_value(r, column) for r in pool])
        after = column_stats([_value(r, column) for r in selection.selected])
        shift[column] = {"candidates": before, "selected": after}
    sources = Counter(str(r.get("source")) for r in selection.selected)
    return {
        "objective": "random" if is_random(config) else list(config.objectives),
        "combine": config.combine,
        "constraints": list(config.constraints),
        "sources": list(config.sources) if config.sources else "all",
        "candidates": selection.candidates,
        "prompts": len(selection.selected) + len(selection.dropped),
        "selected": len(selection.selected),
        "dropped": len(selection.dropped),
        "dropped_reasons": dict(Counter(d["reason"] for d in selection.dropped)),
        "ineligible_candidates": dict(selection.ineligible),
        "selected_per_source": dict(sources),
        "columns": shift,
    }


def select(config: SelectConfig, out: str | Path, *, overwrite: bool = False) -> SelectResult:
    """Select one row per prompt from `config.input` into the run directory `out`.

    An empty selection is an error and writes nothing; so is any bad input.
    """
    rows = read_rows(config.input)
    selection = select_rows(rows, config)
    if not selection.selected:
        reasons = Counter(d["reason"] for d in selection.dropped).most_common(2)
        raise InputError(f"selection is empty: all {len(selection.dropped)} prompts were dropped ("
                         + "; ".join(f"{n} x {r}" for r, n in reasons) + "); relax the constraints or score the "
                         "missing columns")
    run = Run.prepare(out, stage="select", config=config, inputs={"rows": file_input(config.input, len(rows))},
                      seed=config.seed, overwrite=overwrite)
    if run.complete:
        return SelectResult.load(run)
    summary = selection_summary(rows, selection, config)
    written = [write_rows(run, SELECTED, selection.selected)]
    path = run.path / written[0].file
    if selection.dropped:
        written.append(write_rows(run, DROPPED, selection.dropped))
    run.write_json(SUMMARY_FILE, summary)
    write_card(run, written, title="datasteer select: " + ("random selection" if is_random(config) else
                                                           "selection by " + ", ".join(config.objectives)))
    run.finish({"selected": len(selection.selected), "dropped": len(selection.dropped), "output": SELECTED_FILE,
                "summary": SUMMARY_FILE})
    return SelectResult(run_dir=run.path, selected_path=path, selected=len(selection.selected),
                        dropped=len(selection.dropped), summary=summary)
