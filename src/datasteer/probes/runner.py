"""`probe`: score a model on likelihood benchmarks, in a resumable run directory.

    manifest.json                 config, seed, every benchmark's source (files with their sha256, or hub ids)
    shards/<benchmark>/<unit>.jsonl
                                  per-item rows of `chunk_size` consecutive items, written atomically as each unit
                                  finishes: a killed run resumes with the units it has not written
    <benchmark>.jsonl             per-item rows (a dataset card, README.md, gives their schema to `datasets`)
    summary.json                  keyed by benchmark name: the probe's metrics, items, scoring, source
    plots/<benchmark>-reliability.png
                                  mcqa benchmarks: the reliability diagram

Everything that can be wrong with the input is found before the directory is created: an unknown probe or option,
a file in the wrong format, a hub dataset that cannot be reached, a model without what a probe needs (a BOS token
to score whole sentences, a context long enough for the items), a missing optional dependency (lm-eval).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasteer.config import fingerprint
from datasteer.errors import InputError
from datasteer.models import check_finite_weights, config_shape, load_model, load_tokenizer, model_shape, parse_spec
from datasteer.probes.base import build_probe, probe_name
from datasteer.probes.config import BenchmarkSpec, ProbeConfig
from datasteer.probes.data import describe_source, resolve_source
from datasteer.probes.scoring import Encoded, Encoder, LikelihoodScorer
from datasteer.progress import track
from datasteer.rows import load_rows, write_card, write_rows
from datasteer.runs import Run, derive_seed

SUMMARY_FILE = "summary.json"
PLOTS = "plots"
# besides config.OPERATIONAL_FIELDS (device): settings that never change what a run produces (but the last bits of
# float sums), so a run may resume with others; scoring.pack too
OPERATIONAL = ("batch_size",)


@dataclass
class ProbeResult:
    """A finished probe run: `summary` is summary.json (benchmark name -> metrics)."""

    run_dir: Path
    summary: dict[str, Any]
    rows_files: dict[str, Path]
    plots: dict[str, list[Path]]
    scored_units: int = 0  # units computed by this call (the rest were resumed from shards)
    seconds: float = 0.0
    seconds_by_benchmark: dict[str, float] = field(default_factory=dict)  # scoring time of this call's units

    @classmethod
    def load(cls, run: Run | str | Path) -> ProbeResult:
        path = run.path if isinstance(run, Run) else Path(run)
        try:
            summary = json.loads((path / SUMMARY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise InputError(f"{path} is not a finished probe run (no readable {SUMMARY_FILE})") from None
        return cls(run_dir=path, summary=summary,
                   rows_files={name: path / f"{name}.jsonl" for name in summary},
                   plots={name: [path / p for p in s.get("plots", [])] for name, s in summary.items()})

    def rows(self, benchmark: str) -> list[dict[str, Any]]:
        with open(self.rows_files[benchmark], encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def dataset(self, benchmark: str, **load_kwargs: Any) -> Any:
        """A benchmark's rows as a `datasets.Dataset` with their explicit features."""
        return load_rows(self.rows_files[benchmark], **load_kwargs)


@dataclass
class _Benchmark:
    name: str
    spec: BenchmarkSpec
    probe: Any
    items: list[dict[str, Any]]
    input: dict[str, Any]
    encoded: list[list[Encoded]] | None = None  # per item, its requests' encodings (likelihood probes)

    @property
    def scores_itself(self) -> bool:
        return hasattr(self.probe, "evaluate")


def _build(name: str, spec: BenchmarkSpec, config: ProbeConfig) -> _Benchmark:
    """The benchmark's probe (options validated) and its items (limited), or a one-line error."""
    kind = probe_name(name, spec.probe)
    options = dict(spec.options)
    if config.scoring.score and "score" not in options and kind != "lm_eval":
        options["score"] = config.scoring.score
    probe = build_probe(kind, options, where=f"benchmark {name}")
    resolve = getattr(probe, "resolve", None)
    source = resolve(spec.source, spec.subset, spec.split) if resolve else resolve_source(spec.source, spec.subset,
                                                                                          spec.split)
    items = probe.load(source)
    if not items:
        raise InputError(f"benchmark {name}: {spec.source} holds no items")
    total = len(items)
    if config.limit and config.limit < total and not getattr(probe, "takes_limit", False):
        if config.sample == "first":
            items = items[:config.limit]
        else:
            keep = sorted(random.Random(derive_seed(config.seed, "probe", name)).sample(range(total), config.limit))
            items = [items[i] for i in keep]
    describe = getattr(probe, "describe", None)
    info = describe(source, total) if describe else describe_source(source, total)
    info["items"] = len(items)
    return _Benchmark(name=name, spec=spec, probe=probe, items=items, input=info)


def check_benchmarks(config: ProbeConfig) -> None:
    """Find what is wrong with `config`'s benchmarks (unknown probe or option, a file in the wrong format, a hub
    dataset out of reach, a missing extra) without a model: for a pipeline that probes after longer stages."""
    for name, spec in config.benchmarks.items():
        _build(name, spec, config)


def _encode(benchmarks: list[_Benchmark], config: ProbeConfig, loaded: Any) -> Encoder | None:
    """Tokenise every request up front: a model without a BOS where one is needed, an empty option or an item
    longer than the model's context fails here, before anything is written."""
    needing = [b for b in benchmarks if not b.scores_itself]
    if not needing:
        return None
    if loaded is not None:
        tokenizer, shape = loaded.tokenizer, config_shape(loaded.model.config)
        model_config = loaded.model.config
    else:
        tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        shape, model_config = model_shape(config.model, trust_remote_code=config.trust_remote_code), None
        kind, name, _ = parse_spec(config.model)
        if getattr(tokenizer, "bos_token_id", None) is None and config.scoring.bos == "auto" and kind in ("local",
                                                                                                         "hub"):
            from transformers import AutoConfig  # the config alone, for its bos_token_id (no weights)

            try:
                model_config = AutoConfig.from_pretrained(name, trust_remote_code=config.trust_remote_code)
            except (OSError, ValueError):
                model_config = None
    encoder = Encoder(tokenizer, bos=config.scoring.bos, model_config=model_config, max_length=shape.context,
                      too_long=config.scoring.too_long, model=f"model '{config.model}'")
    for b in needing:
        bind = getattr(b.probe, "bind", None)  # a probe whose prompts depend on the tokenizer (its chat template)
        if bind is not None:
            bind(tokenizer)
        requests, owners, counts = [], [], []
        for item in b.items:
            asked = b.probe.requests(item)
            requests += asked
            owners += [f"{b.name} item {item['item_id']}"] * len(asked)
            counts.append(len(asked))
        flat = encoder.encode(requests, owners)
        b.encoded, at = [], 0
        for n in counts:
            b.encoded.append(flat[at:at + n])
            at += n
    return encoder


def _chunk(b: _Benchmark, config: ProbeConfig) -> int:
    """Items per unit: `chunk_size`, or one task per unit for a probe that evaluates the model itself."""
    return 1 if b.scores_itself else config.chunk_size


def _fingerprint(config: ProbeConfig) -> dict[str, Any]:
    data = fingerprint(config)
    for key in OPERATIONAL:
        data.pop(key, None)
    data["scoring"].pop("pack", None)
    return data


def probe(config: ProbeConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
          loaded: Any = None) -> ProbeResult:
    """Score `config.model` on every benchmark of `config` into the run directory `out` (resumable).

    `loaded`: an already loaded `datasteer.models.LoadedModel` to use instead of loading `config.model`."""
    benchmarks = [_build(name, spec, config) for name, spec in config.benchmarks.items()]
    encoder = _encode(benchmarks, config, loaded)
    run = Run.prepare(out, stage="probe", config=_fingerprint(config),
                      inputs={b.name: b.input for b in benchmarks}, seed=config.seed, overwrite=overwrite)
    if run.complete:
        return ProbeResult.load(run)

    units = [(b, i, lo, min(lo + _chunk(b, config), len(b.items)))
             for b in benchmarks for i, lo in enumerate(range(0, len(b.items), _chunk(b, config)))]
    pending = [u for u in units if not run.has_shard(u[0].name, f"{u[1]:06d}")]
    pending_keys = {(u[0].name, u[1]) for u in pending}
    start = time.perf_counter()
    seconds: dict[str, float] = {b.name: 0.0 for b in benchmarks}
    if pending:
        if loaded is None:
            loaded = load_model(config.model, dtype=config.dtype, device=config.device,
                                trust_remote_code=config.trust_remote_code)
        check_finite_weights(loaded.model, config.model)
        scorer = LikelihoodScorer(loaded.model, batch_size=config.batch_size, pack=config.scoring.pack)
        done = sum(hi - lo for b, i, lo, hi in units if (b.name, i) not in pending_keys)
        total = sum(len(b.items) for b in benchmarks)
        with track("probe", total, done=done, enabled=progress, unit="items", tokens=False) as tracker:
            for b, index, lo, hi in pending:
                tracker.describe(f"probe [{b.name}]")
                began = time.perf_counter()
                chunk = b.items[lo:hi]
                if b.scores_itself:
                    rows = b.probe.evaluate(chunk, loaded, batch_size=config.batch_size, limit=config.limit,
                                            seed=config.seed, device=str(scorer.device))
                else:
                    assert b.encoded is not None
                    encoded = b.encoded[lo:hi]
                    flat = scorer.score([e for per_item in encoded for e in per_item])
                    rows, at = [], 0
                    for item, per_item in zip(chunk, encoded):
                        rows.append(b.probe.row(item, flat[at:at + len(per_item)]))
                        at += len(per_item)
                run.write_shard(b.name, f"{index:06d}", rows)
                seconds[b.name] += time.perf_counter() - began
                tracker.advance(hi - lo)
    elapsed = time.perf_counter() - start

    summary: dict[str, Any] = {}
    written, plots = [], {}
    for b in benchmarks:
        n_units = len(range(0, len(b.items), _chunk(b, config)))
        rows = list(run.iter_shard_rows((b.name, f"{i:06d}") for i in range(n_units)))
        written.append(write_rows(run, b.name, rows))
        entry: dict[str, Any] = {"probe": b.probe.name, "source": b.spec.source, "items": len(b.items)}
        if not b.scores_itself:
            entry.update(score=b.probe.score, bos=encoder.bos_text if encoder else None,
                         truncated=sum(e.truncated for per_item in (b.encoded or []) for e in per_item))
        entry.update(b.probe.summarize(rows))
        make_plots = getattr(b.probe, "plots", None)
        if make_plots is not None:
            files = make_plots(b.name, entry)
            for filename, data in files.items():
                run.write_output(f"{PLOTS}/{filename}", data)
            entry["plots"] = [f"{PLOTS}/{f}" for f in files]
            plots[b.name] = [run.path / PLOTS / f for f in files]
        summary[b.name] = entry
    run.write_json(SUMMARY_FILE, summary)
    write_card(run, written, title=f"datasteer probe: {config.model}",
               description=f"Likelihood probes of `{config.model}`: one rows file per benchmark "
               f"({', '.join(b.name for b in benchmarks)}), metrics in `{SUMMARY_FILE}`.")
    run.finish({"benchmarks": {b.name: len(b.items) for b in benchmarks}, "summary": SUMMARY_FILE})
    return ProbeResult(run_dir=run.path, summary=summary, rows_files={b.name: run.path / w.file
                                                                      for b, w in zip(benchmarks, written)},
                       plots=plots, scored_units=len(pending), seconds=elapsed, seconds_by_benchmark=seconds)
