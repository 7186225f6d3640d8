"""Configuration of `score`, and the one metric-list syntax every command shares."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from datasteer.config import StrictModel
from datasteer.engines import EngineConfig
from datasteer.metrics.base import parse_metrics


def split_metric_specs(value: Any) -> Any:
    """"mtld,toxicity[backend=detoxify,device=cpu]" (a flag or a recipe string) -> one spec per metric."""
    if isinstance(value, str):
        return [str(spec) for spec in parse_metrics(value)]
    return value


class ScoreConfig(StrictModel):
    """`datasteer score`: one column per metric added to every row of a file."""

    input: str = Field(..., description="rows to score: .jsonl/.json/.parquet/.csv file")
    metrics: list[str] = Field(..., min_length=1, description="metric specs: mtld, length, "
                               "toxicity[backend=detoxify], judge[model=...], package.module:function "
                               "(see `datasteer metrics`)")
    text_field: str = Field("completion", description="column with the texts to score")
    prompt_field: str = Field("prompt", description="column with the prompts (judge and custom metrics)")
    id_field: str = Field("prompt_id", description="column grouping the samples of one prompt (toxicity EMT / TP)")
    chunk_size: int = Field(256, ge=1, description="rows per resumable unit of work")
    output_format: Literal["jsonl", "parquet"] = Field("jsonl", description="scored rows file format: jsonl, or "
                                                       "parquet for large runs")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="where units run: local (this process) "
                                 "or ray (operational: not part of the run's identity)")

    _split = field_validator("metrics", mode="before")(classmethod(lambda cls, v: split_metric_specs(v)))
