"""`profile`: the generation profile of a model on held-out prompts.

A profile is `generate` (k samples per prompt, greedy by default) followed by `score` (every
metric), in one run directory:

    manifest.json     the profile's config (model, sampling, metrics) and prompt set
    generations/      the generate run (resumable shards)
    scores/           the score run (resumable shards)
    profile.jsonl     one row per sample: prompt, completion, and one column per metric
    profile.json      model, label, sampling, k, prompts, and per metric: count, missing, mean,
                      std, quantiles (and EMT / Toxicity Probability for toxicity columns)

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
from datasteer.io import describe_input, read_prompts
from datasteer.metrics.base import build_scorers, parse_metrics
from datasteer.metrics.config import ScoreConfig
from datasteer.metrics.runner import score
from datasteer.runs import Run

PROFILE_ROWS = "profile.jsonl"
PROFILE_SUMMARY = "profile.json"


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
                         system_prompt=config.system_prompt, batch_size=config.batch_size, dtype=config.dtype,
                         device=config.device)


def profile(config: ProfileConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
            loaded: Any = None) -> Profile:
    """Profile `config.model` on `config.prompts` into the run directory `out` (resumable)."""
    prompts = read_prompts(config.prompts)
    specs = [str(s) for s in parse_metrics(config.metrics)]
    scorers = build_scorers(specs)  # unknown metrics and missing extras fail here, before any work
    run = Run.prepare(out, stage="profile", config=config,
                      inputs={"prompts": describe_input(config.prompts, prompts)}, seed=config.seed,
                      overwrite=overwrite)
    if run.complete:
        return load_profile(run.path)
    tc = teacher_config(config)
    teacher = TransformersTeacher(tc, loaded=loaded)
    teacher.load()  # a bad model spec fails here, before the run directory exists
    run.ensure_created()
    gen_config = GenerateConfig(prompts=config.prompts, teachers=[tc], seed=config.seed)
    generated = generate(gen_config, run.path / "generations", overwrite=overwrite, progress=progress,
                         teachers={tc.name: teacher})
    score_config = ScoreConfig(input=str(generated.candidates_path), metrics=specs)
    scored = score(score_config, run.path / "scores", overwrite=overwrite, progress=progress, scorers=scorers)
    rows_bytes = scored.scored_path.read_bytes()
    run.write_output(PROFILE_ROWS, rows_bytes)
    tokens = [json.loads(line)["completion_tokens"] for line in rows_bytes.splitlines()]
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
    run.write_json(PROFILE_SUMMARY, summary)
    run.finish({"label": config.name, "samples": scored.rows, "output": PROFILE_SUMMARY})
    return load_profile(run.path)
