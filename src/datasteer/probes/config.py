"""Configuration of `probe`: which model, which benchmarks, how items are scored."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from datasteer.config import StrictModel
from datasteer.errors import ConfigError
from datasteer.probes.base import Score
from datasteer.probes.scoring import Bos, TooLong

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class BenchmarkSpec(StrictModel):
    """One benchmark: where its rows are and which probe reads them. A bare text is short for `{source: TEXT}`."""

    source: str = Field(..., description="a local file or folder in the benchmark's own format, hf:OWNER/NAME (a "
                        "hub dataset), or for lm_eval a comma-separated list of task names")
    probe: str | None = Field(None, description="bbq, stereoset, crows_pairs, mcqa, lm_eval or package.module:Class; "
                              "default: the benchmark's name (openbookqa, mmlu, hellaswag, arc_* mean mcqa)")
    subset: str | None = Field(None, description="hub dataset config (e.g. main for allenai/openbookqa)")
    split: str | None = Field(None, description="hub split; default: the probe's (test, or validation)")
    options: dict[str, Any] = Field(default_factory=dict, description="the probe's own options (template, score, "
                                    "choices, answer, ...)")

    @model_validator(mode="before")
    @classmethod
    def _source_alone(cls, data: Any) -> Any:
        return {"source": data} if isinstance(data, str) else data


class ScoringConfig(StrictModel):
    """How texts become log-likelihoods, for every benchmark of a run."""

    score: Score | None = Field(None, description="mean (mean token log-likelihood) or sum, for every benchmark "
                                "whose options do not say; default: each probe's own (mean; crows_pairs: sum)")
    bos: Bos = Field("auto", description="auto: sequences start with the model's own BOS token (never counted as "
                     "scored); none: no BOS (whole sentences are then scored from their second token)")
    too_long: TooLong = Field("error", description="a sequence longer than the model's context: error, or truncate "
                              "its context from the left")
    pack: bool = Field(True, description="score the options of one question in one packed row (the context once); "
                       "self-checked, and the same numbers as unpacked (operational: not part of the run's identity)")


class ProbeConfig(StrictModel):
    """`datasteer probe`: score a model, without sampling, on likelihood benchmarks."""

    model: str = Field(..., description="model spec: embedded:smollm2, tiny:llama, a local directory or a hub id")
    benchmarks: dict[str, BenchmarkSpec] = Field(..., min_length=1, description="benchmark name -> source (or a "
                                                 "spec); the name keys summary.json and names the rows file")
    limit: int | None = Field(None, ge=1, description="at most N items per benchmark (lm_eval: first N documents "
                              "per task)")
    sample: Literal["random", "first"] = Field("random", description="which items --limit keeps: a seeded random "
                                               "sample (kept in file order) or the first N")
    seed: int = Field(0, description="seed of the --limit sample (scoring itself is deterministic)")
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    batch_size: int = Field(16, ge=1, description="sequences per forward pass (operational: not part of the "
                            "run's identity)")
    chunk_size: int = Field(64, ge=1, description="items per resumable unit")
    dtype: str = Field("auto", description="model dtype: auto (float32 on CPU, bfloat16 on GPU), float32, ...")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1 (operational)")
    trust_remote_code: bool = False

    @field_validator("benchmarks")
    @classmethod
    def _names(cls, value: dict[str, BenchmarkSpec]) -> dict[str, BenchmarkSpec]:
        for name in value:
            if not _NAME.match(name):
                raise ValueError(f"benchmark name {name!r} must be letters, digits, '_', '-' or '.' (it names files)")
        return value


def parse_benchmark(text: str) -> tuple[str, str]:
    """A `--benchmark NAME=SOURCE` flag as (name, source) for `ProbeConfig.benchmarks` (NAME picks the probe when it
    is one's name or alias: bbq, stereoset, crows_pairs, mcqa, openbookqa, mmlu, ...)."""
    name, sep, source = text.partition("=")
    if not sep or not name.strip() or not source.strip():
        raise ConfigError(f"--benchmark {text!r}: write NAME=PATH, e.g. bbq=data/bbq or openbookqa=obqa.jsonl")
    return name.strip(), source.strip()
