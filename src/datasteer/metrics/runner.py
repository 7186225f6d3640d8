"""`score`: add one column per metric to every row, in a resumable run directory.

Work is cut into units of (metric, `chunk_size` consecutive rows); each unit's values are one
atomic shard, so a crash loses at most the unit in progress, and a slow metric (a judge, a
remote API) that fails half-way keeps every metric and chunk that finished. Units run through an executor
(`datasteer.engines`: this process, or Ray actors that build each scorer once), and this process writes every
shard. The merged `scored.jsonl` (or `scored.parquet`, `output_format: parquet`) holds the input rows, in order,
with the new columns; missing values (NaN from a scorer) are JSON null and are counted in the summary, never dropped. A
dataset card, `README.md`, gives the rows' explicit schema (and each metric's description) to `datasets`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasteer.engines import Group, open_executor
from datasteer.errors import ConfigError, InputError
from datasteer.io import read_rows
from datasteer.metrics.base import Scorer, build_scorers, metric_columns, parse_metrics
from datasteer.metrics.config import ScoreConfig
from datasteer.progress import track
from datasteer.rows import load_rows, rows_file, write_card, write_rows
from datasteer.runs import Run, file_input
from datasteer.stats import column_stats

SCORED = "scored"
SCORED_FILE = rows_file(SCORED, "jsonl")  # scored.parquet with output_format: parquet
SUMMARY_FILE = "summary.json"


@dataclass
class ScoreResult:
    run_dir: Path
    scored_path: Path
    rows: int
    columns: list[str]
    summary: dict[str, Any]
    scored_units: int  # units computed by this call (the rest were resumed from shards)
    seconds: float
    missing: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, run: Run) -> ScoreResult:
        """The result of a finished score run, read back from its directory."""
        summary = json.loads((run.path / SUMMARY_FILE).read_text(encoding="utf-8"))
        columns = list(summary["metrics"])
        output = run.manifest.get("summary", {}).get("output", SCORED_FILE)
        return cls(run_dir=run.path, scored_path=run.path / output, rows=summary["rows"], columns=columns,
                   summary=summary, scored_units=0, seconds=0.0,
                   missing={c: summary["metrics"][c]["missing"] for c in columns})

    def dataset(self, **load_kwargs: Any) -> Any:
        """The scored rows as a `datasets.Dataset` with their explicit features (`datasteer.rows.load_rows`)."""
        return load_rows(self.scored_path, **load_kwargs)


class ScorerWorker:
    """Scores units (a chunk's texts, and prompts when the metric needs them) with one scorer, `batch_size` texts
    per call: the worker of a metric's group, in this process or on a Ray actor."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer

    def run(self, unit: tuple[list[str], list[str] | None]) -> list[float]:
        texts, prompts = unit
        scorer, values = self.scorer, []
        for b in range(0, len(texts), scorer.batch_size):
            e = min(b + scorer.batch_size, len(texts))
            got = scorer.score(texts[b:e], prompts[b:e] if prompts is not None else None)
            if len(got) != e - b:
                raise RuntimeError(f"metric {scorer.name} returned {len(got)} values for {e - b} texts")
            values.extend(got)
        return values

    def close(self) -> None:
        close = getattr(self.scorer, "close", None)
        if close is not None:
            close()


class ScorerSetup:
    """The scorer a worker uses: here the one already built; pickled for a Ray actor, its spec when it has one
    (each actor builds, and loads, its own: a Detoxify model is not shipped), else the scorer object itself."""

    def __init__(self, scorer: Scorer | None, spec: str | None = None, name: str | None = None):
        self.scorer, self.spec, self.name = scorer, spec, name or getattr(scorer, "name", None)

    def __reduce__(self) -> tuple[Any, ...]:
        return (ScorerSetup, (None, self.spec, self.name) if self.spec else (self.scorer, None, self.name))

    def __call__(self) -> ScorerWorker:
        if self.scorer is None:
            assert self.spec is not None
            self.scorer = next(s for s in build_scorers([self.spec]) if s.name == self.name)
        return ScorerWorker(self.scorer)


def _check_rows(rows: list[dict[str, Any]], config: ScoreConfig, scorers: list[Scorer]) -> None:
    if not rows:
        raise InputError(f"{config.input} has no rows to score")
    needs_prompts = [s.name for s in scorers if s.needs_prompts]
    for i, row in enumerate(rows, 1):
        if not isinstance(row.get(config.text_field), str):
            what = "has no" if config.text_field not in row else "has a non-text"
            raise InputError(f"{config.input}: row {i} {what} '{config.text_field}' field; "
                             "pass --text-field to name the column with the texts")
        if needs_prompts and not isinstance(row.get(config.prompt_field), str):
            raise InputError(f"{config.input}: row {i} has no '{config.prompt_field}' text, which metric(s) "
                             f"{', '.join(needs_prompts)} need; pass --prompt-field")
    taken = sorted({s.name for s in scorers} & set(rows[0]))
    if taken:
        raise ConfigError(f"{config.input} already has column(s) {taken}; score into a new name with "
                          f"column=, e.g. {taken[0]}[column={taken[0]}_2]")


def score(config: ScoreConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
          scorers: list[Scorer] | None = None) -> ScoreResult:
    """Score every row of `config.input` with every metric into the run directory `out`."""
    rows = read_rows(config.input)
    specs = [str(s) for s in parse_metrics(config.metrics)]
    executor = open_executor(config.engine)  # the ray engine without ray installed fails here, before anything
    # on Ray each actor builds its scorer from the spec that names its column (no loaded model is shipped)
    specs_of = {} if scorers is not None else {column: spec for spec in specs for column in metric_columns([spec])}
    scorers = scorers if scorers is not None else build_scorers(specs)
    _check_rows(rows, config, scorers)
    config = config.model_copy(update={"metrics": specs})
    run = Run.prepare(out, stage="score", config=config,
                      inputs={"rows": file_input(config.input, len(rows))}, seed=0, overwrite=overwrite)
    if run.complete:
        return ScoreResult.load(run)
    texts = [r[config.text_field] for r in rows]
    prompts = [r.get(config.prompt_field) for r in rows]
    chunks = [(lo, min(lo + config.chunk_size, len(rows))) for lo in range(0, len(rows), config.chunk_size)]
    units = [(s, i, lo, hi) for s in scorers for i, (lo, hi) in enumerate(chunks)]
    pending = [u for u in units if not run.has_shard(u[0].name, f"{u[1]:06d}")]
    pending_keys = {(u[0].name, u[1]) for u in pending}
    start = time.perf_counter()
    done_rows = sum(hi - lo for s, i, lo, hi in units if (s.name, i) not in pending_keys)
    with executor, track("score", len(rows) * len(scorers), done=done_rows, enabled=progress, unit="values",
                         tokens=False) as tracker:
        for scorer in scorers:
            todo = [u for u in pending if u[0] is scorer]
            if not todo:
                continue
            tracker.describe(f"score [{scorer.name}]")

            def finished(position: int, values: list[float], todo: list[Any] = todo) -> None:
                metric, index, lo, hi = todo[position]
                run.write_shard(metric.name, f"{index:06d}",  # this process is the only writer
                                [{"v": v if math.isfinite(v) else None} for v in map(float, values)])
                tracker.advance(hi - lo)

            group = Group(key=f"metric/{scorer.name}", label=f"metric {scorer.name}",
                          setup=ScorerSetup(scorer, specs_of.get(scorer.name)),
                          units=[(texts[lo:hi], prompts[lo:hi] if scorer.needs_prompts else None)
                                 for _, _, lo, hi in todo],
                          names=[f"{index:06d}" for _, index, _, _ in todo])
            executor.run(group, finished)
    seconds = time.perf_counter() - start

    columns = [s.name for s in scorers]
    merged: dict[str, list[float | None]] = {}
    for scorer in scorers:
        merged[scorer.name] = [r["v"] for i in range(len(chunks)) for r in run.read_shard(scorer.name, f"{i:06d}")]
    scored = [{**row, **{c: merged[c][i] for c in columns}} for i, row in enumerate(rows)]
    written = write_rows(run, SCORED, scored, format=config.output_format,
                         descriptions={s.name: getattr(s, "description", "") for s in scorers})
    path = run.path / written.file
    summary = _summary(config, rows, scorers, merged)
    run.write_json(SUMMARY_FILE, summary)
    write_card(run, [written], title="datasteer score: scored rows")
    run.finish({"rows": len(rows), "columns": columns, "output": written.file, "summary": SUMMARY_FILE})
    return ScoreResult(run_dir=run.path, scored_path=path, rows=len(rows), columns=columns, summary=summary,
                       scored_units=len(pending), seconds=seconds,
                       missing={c: summary["metrics"][c]["missing"] for c in columns})


def _summary(config: ScoreConfig, rows: list[dict[str, Any]], scorers: list[Scorer],
             merged: dict[str, list[float | None]]) -> dict[str, Any]:
    """Per column: the scorer's description and direction, its statistics, and what the scorer itself adds."""
    groups = [str(r[config.id_field]) for r in rows] if all(config.id_field in r for r in rows) else None
    metrics: dict[str, Any] = {}
    for scorer in scorers:
        values = merged[scorer.name]
        entry = {"description": scorer.description, "higher_is_better": scorer.higher_is_better,
                 **column_stats(values)}
        summarize = getattr(scorer, "summarize", None)  # optional for scorers written against the protocol
        if summarize is not None:
            entry.update(summarize(values, groups))
        metrics[scorer.name] = entry
    return {"rows": len(rows), "text_field": config.text_field, "metrics": metrics}
