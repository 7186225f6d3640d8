"""Preferences: two models' answers judged pairwise (`pairwise`), and the pairs a "model as a judge" profile reads.

    pairwise(first, second, config, out)
        the answers of two profiles to the same prompts, judged by `config.judge` in both orders (the `judge`
        probe, datasteer.probes.judge): does the second model's answer win? Response 1 of each pair is the
        second profile's (the candidate), response 2 the first's (the baseline), so `win_rate` is the second
        model's win rate (ties count half) with its 95% interval; 0.5 = no preference.

    OUT/
        manifest.json
        pairs.jsonl      prompt, response_1 (second), response_2 (first), the metric columns both answers have
        judge/           the probe run: per-pair verdicts (judge.jsonl) and summary.json
        summary.json     labels, judge, pairs, win rate with its interval, tie rate, position bias

`candidate_pairs` builds the pairs of the judge profile of a study: two teacher candidates for the same prompt,
with every metric both have as attributes, so that a profile says how often (and how strongly) a model prefers the
longer, the plainer, the more diverse answer, and how that changes after training.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasteer.errors import InputError
from datasteer.inheritance.config import PairwiseConfig
from datasteer.inheritance.profile import PROFILE_ROWS, Profile, load_profile
from datasteer.probes.config import BenchmarkSpec, ProbeConfig
from datasteer.probes.runner import ProbeResult, probe
from datasteer.rows import dump_rows
from datasteer.runs import Run, derive_seed, file_input
from datasteer.stats import is_number

PAIRS_FILE = "pairs.jsonl"
JUDGE_DIR = "judge"
SUMMARY_FILE = "summary.json"


@dataclass
class PairwiseResult:
    run_dir: Path
    summary: dict[str, Any]
    judged: ProbeResult


def _first_samples(profile: Profile) -> dict[str, dict[str, Any]]:
    """Each prompt's first sample (sample_index 0) of a profile, by prompt id."""
    out: dict[str, dict[str, Any]] = {}
    for row in profile.rows:
        if row.get("sample_index", 0) == 0:
            out.setdefault(str(row["prompt_id"]), row)
    return out


def _attributes(row_1: dict[str, Any], row_2: dict[str, Any], names: list[str] | None) -> dict[str, float]:
    columns = names if names is not None else [k for k in row_1 if k in row_2]
    out = {}
    for name in columns:
        a, b = row_1.get(name), row_2.get(name)
        if is_number(a) and is_number(b) and name not in ("sample_index", "seed", "prompt_tokens", "completion_tokens"):
            out[f"{name}_1"], out[f"{name}_2"] = float(a), float(b)
    return out


def profile_pairs(first: Profile, second: Profile, attributes: list[str] | None = None,
                  limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Pairs of the two profiles' answers to the prompts both answered: response 1 = `second`'s, response 2 =
    `first`'s (an empty answer is judged as it is: a model that says nothing loses to one that answers)."""
    a, b = _first_samples(first), _first_samples(second)
    ids = [i for i in a if i in b]
    if not ids:
        raise InputError(f"profiles '{first.label}' and '{second.label}' share no prompt; profile both models on the "
                         "same prompts")
    if limit is not None and limit < len(ids):
        keep = set(random.Random(derive_seed(seed, "pairs")).sample(ids, limit))
        ids = [i for i in ids if i in keep]
    return [{"pair_id": i, "prompt": a[i]["prompt"], "response_1": b[i]["completion"],
             "response_2": a[i]["completion"], **_attributes(b[i], a[i], attributes)} for i in ids]


def candidate_pairs(rows: list[dict[str, Any]], count: int, seed: int = 0,
                    attributes: list[str] | None = None) -> list[dict[str, Any]]:
    """`count` pairs of two candidates for one prompt each (prompts drawn at random with `seed`; candidates from
    two different teachers when the prompt has them, else two samples of one), with their metric columns as
    attributes. Empty candidates are left out."""
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if isinstance(row.get("completion"), str) and row["completion"].strip():
            by_prompt.setdefault(str(row["prompt_id"]), []).append(row)
    usable = sorted(p for p, group in by_prompt.items() if len(group) >= 2)
    if not usable:
        raise InputError("no prompt has two non-empty candidates to pair; generate k >= 2 or several teachers")
    rng = random.Random(derive_seed(seed, "candidate-pairs"))
    chosen = sorted(rng.sample(usable, min(count, len(usable))), key=usable.index)
    pairs = []
    for pid in chosen:
        group = by_prompt[pid]
        sources = sorted({r["source"] for r in group})
        if len(sources) >= 2:
            s1, s2 = rng.sample(sources, 2)
            one = rng.choice([r for r in group if r["source"] == s1])
            two = rng.choice([r for r in group if r["source"] == s2])
        else:
            one, two = rng.sample(group, 2)
        pairs.append({"pair_id": pid, "prompt": one["prompt"], "response_1": one["completion"],
                      "response_2": two["completion"], "source_1": one["source"], "source_2": two["source"],
                      **_attributes(one, two, attributes)})
    return pairs


def judge_config(config: PairwiseConfig, pairs_path: Path, benchmark: str = "judge") -> ProbeConfig:
    """The probe run that judges a pairs file with `config.judge`."""
    return ProbeConfig(model=config.judge, benchmarks={benchmark: BenchmarkSpec(
        source=str(pairs_path), probe="judge", options=config.options)}, seed=config.seed,
        batch_size=config.batch_size, dtype=config.dtype, device=config.device)


def pairwise(first: Profile | str | Path, second: Profile | str | Path, config: PairwiseConfig, out: str | Path, *,
             overwrite: bool = False, progress: bool = True, loaded: Any = None) -> PairwiseResult:
    """Judge `second`'s answers against `first`'s (see the module docstring) into the run directory `out`."""
    first = first if isinstance(first, Profile) else load_profile(first)
    second = second if isinstance(second, Profile) else load_profile(second)
    pairs = profile_pairs(first, second, config.attributes, config.limit, config.seed)
    run = Run.prepare(out, stage="pairwise", config=config, seed=config.seed, overwrite=overwrite,
                      inputs={"first": file_input(first.path / PROFILE_ROWS, len(first.rows)),
                              "second": file_input(second.path / PROFILE_ROWS, len(second.rows))})
    if run.complete:
        return PairwiseResult(run.path, json.loads((run.path / SUMMARY_FILE).read_text(encoding="utf-8")),
                              ProbeResult.load(run.path / JUDGE_DIR))
    pairs_path = run.write_output(PAIRS_FILE, dump_rows(pairs))
    judged = probe(judge_config(config, pairs_path), run.path / JUDGE_DIR, overwrite=overwrite, progress=progress,
                   loaded=loaded)
    entry = judged.summary["judge"]
    summary = {"first": first.label, "second": second.label, "judge": config.judge, "pairs": entry["pairs"],
               "win_rate": entry["win_rate_1"], "p_second": entry["p1"], "wins": entry["wins_1"],
               "losses": entry["wins_2"], "tie_rate": entry["tie_rate"],
               "first_position_rate": entry["first_position_rate"], "prefers_more": entry["prefers_more"]}
    run.write_json(SUMMARY_FILE, summary)
    run.finish({"pairs": entry["pairs"], "summary": SUMMARY_FILE})
    return PairwiseResult(run.path, summary, judged)
