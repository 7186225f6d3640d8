"""`profile`: the generation profile of a model on held-out prompts.

A profile is `generate` (k samples per prompt, greedy by default) followed by `score` (every
metric), in one run directory:

    manifest.json     the profile's config (model, sampling, metrics) and prompt set
    generations/      the generate run (resumable shards)
    scores/           the score run (resumable shards)
    probes/           the probe run of the profile's `probes` benchmarks, when it has any (likelihood probes)
    profile.jsonl     one row per sample: prompt, completion, and one column per metric
    README.md         a dataset card: profile.jsonl's explicit schema for `datasets.load_dataset(RUN_DIR)`
    profile.json      model, label, sampling, k, prompts, and per metric: count, missing, mean,
                      std, quantiles (and EMT / Toxicity Probability for toxicity columns); `probes`: each
                      benchmark's summary

A killed profile resumes where it stopped, through its two sub-runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasteer.errors import InputError
from datasteer.generation.config import GenerateConfig
from datasteer.generation.runner import generate
from datasteer.generation.transformers_backend import TransformersTeacher, TransformersTeacherConfig
from datasteer.inheritance.config import ProfileConfig
from datasteer.io import describe_input, read_prompts, read_rows
from datasteer.metrics.base import build_scorers, parse_metrics
from datasteer.metrics.config import ScoreConfig
from datasteer.metrics.runner import score
from datasteer.probes.runner import check_benchmarks, probe
from datasteer.rows import load_rows, rows_file, write_card, write_rows
from datasteer.runs import Run

PROFILE = "profile"
PROFILE_ROWS = rows_file(PROFILE)
PROFILE_SUMMARY = "profile.json"
PROBES = "probes"  # the probe run of `probes:` inside the profile's directory


@dataclass
class Profile:
    """A finished profile, as read back from its run directory."""

    path: Path
    label: str
    model: str
    summary: dict[str, Any]  # profile.json
    rows: list[dict[str, Any]]  # profile.jsonl

    @property
    def metrics(self) -> dict[str, Any]:
        return self.summary["metrics"]

    def dataset(self, **load_kwargs: Any) -> Any:
        """The profile's rows as a `datasets.Dataset` with their explicit features (`datasteer.rows.load_rows`)."""
        return load_rows(self.path / PROFILE_ROWS, **load_kwargs)


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    summary_path = path / PROFILE_SUMMARY if path.is_dir() else path
    if summary_path.name != PROFILE_SUMMARY or not summary_path.is_file():
        raise InputError(f"{path} is not a finished profile (no {PROFILE_SUMMARY}); run `datasteer profile` first")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    rows_path = summary_path.parent / PROFILE_ROWS
    rows = [json.loads(line) for line in rows_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return Profile(path=summary_path.parent, label=summary["label"], model=summary["model"], summary=summary,
                   rows=rows)


def teacher_config(config: ProfileConfig) -> TransformersTeacherConfig:
    return TransformersTeacherConfig(name=config.name, model=config.model, k=config.k, sampling=config.sampling,
                                     system_prompt=config.system_prompt, batch_size=config.batch_size,
                                     dtype=config.dtype, device=config.device, too_long=config.too_long)


def profile(config: ProfileConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
            loaded: Any = None) -> Profile:
    """Profile `config.model` on `config.prompts` into the run directory `out` (resumable)."""
    prompts = read_prompts(config.prompts)
    specs = [str(s) for s in parse_metrics(config.metrics)]
    scorers = build_scorers(specs)  # unknown metrics and missing extras fail here, before any work
    probe_config = config.probe_config()
    if probe_config is not None:
        check_benchmarks(probe_config)  # and so does a benchmark file in the wrong format
    run = Run.prepare(out, stage="profile", config=config,
                      inputs={"prompts": describe_input(config.prompts, prompts)}, seed=config.seed,
                      overwrite=overwrite)
    if run.complete:
        return load_profile(run.path)
    tc = teacher_config(config)
    teacher = TransformersTeacher(tc, loaded=loaded)
    teacher.load()  # a bad model spec (or NaN weights) fails here, before the run directory exists
    # and so does a prompt too long for the model's context
    teacher.check_prompts(prompts, who=f"profile of {config.model}",
                          remedy="shorten it or lower max_new_tokens (--max-new-tokens, sampling.max_new_tokens)")
    run.ensure_created()
    gen_config = GenerateConfig(prompts=config.prompts, teachers=[tc], seed=config.seed)
    generated = generate(gen_config, run.path / "generations", overwrite=overwrite, progress=progress,
                         teachers={tc.name: teacher})
    score_config = ScoreConfig(input=str(generated.candidates_path), metrics=specs)
    scored = score(score_config, run.path / "scores", overwrite=overwrite, progress=progress, scorers=scorers)
    probed = None
    if probe_config is not None:
        probed = probe(probe_config, run.path / PROBES, overwrite=overwrite, progress=progress,
                       loaded=teacher.loaded)
    rows = read_rows(scored.scored_path)
    written = write_rows(run, PROFILE, rows, descriptions={s.name: getattr(s, "description", "") for s in scorers})
    tokens = [row["completion_tokens"] for row in rows]
    summary = {
        "label": config.name,
        "model": config.model,
        "prompts": describe_input(config.prompts, prompts),
        "k": config.k,
        "sampling": config.sampling.model_dump(),
        "system_prompt": config.system_prompt,
        "seed": config.seed,
        "samples": scored.rows,
        "mean_completion_tokens": sum(tokens) / len(tokens),
        "metrics": scored.summary["metrics"],
    }
    if probed is not None:
        summary["probes"] = probed.summary
    run.write_json(PROFILE_SUMMARY, summary)
    write_card(run, [written], title=f"datasteer profile: {config.name}",
               description=f"The generation profile of `{config.model}` (label `{config.name}`): one row per sample "
               "with every metric; statistics in `profile.json`.")
    run.finish({"label": config.name, "samples": scored.rows, "output": PROFILE_SUMMARY})
    return load_profile(run.path)
