"""Configuration models for every stage.

The Python API, YAML recipes and CLI flags all fill the same pydantic models. A config's
*fingerprint* (everything that changes what a run produces) is what a run directory's manifest
records and what resume compares; operational knobs (concurrency, timeouts, retries, device)
are left out of it, so they can change between a crashed run and its resumption.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from datasteer.errors import ConfigError, InputError

# Fields that change how fast or where work runs, never what it produces.
OPERATIONAL_FIELDS = frozenset({"concurrency", "timeout_s", "max_retries", "device"})


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SamplingConfig(StrictModel):
    """Sampling parameters. temperature 0 means greedy decoding."""

    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, description="None: no top-k truncation")
    max_new_tokens: int = Field(256, ge=1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class TeacherConfig(StrictModel):
    """One teacher: a named model with its own backend, sampling parameters and system prompt."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    model: str = Field(..., min_length=1, description="model spec (embedded:smollm2, HF id, local dir, tiny:llama) "
                       "or, for the openai backend, the model name the server expects")
    backend: Literal["transformers", "openai", "vllm"] = "transformers"
    k: int = Field(1, ge=1, description="candidates per prompt from this teacher")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    system_prompt: str | None = None
    batch_size: int = Field(8, ge=1, description="prompts per generation batch (one resumable unit of work)")
    # transformers / vllm
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    # openai-compatible HTTP
    base_url: str | None = None
    api_key_env: str | None = Field(None, description="name of the environment variable holding the API key; "
                                    "the key itself is never stored")
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0)

    @model_validator(mode="after")
    def _backend_fields(self) -> TeacherConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError(f"teacher '{self.name}': the openai backend needs base_url "
                             "(for example http://127.0.0.1:8000/v1)")
        return self


class PromptsConfig(StrictModel):
    """Where prompts come from: a JSONL/JSON/Parquet/CSV file or a `datasets` name (hf:NAME)."""

    path: str
    prompt_field: str = "prompt"
    id_field: str | None = Field(None, description="column holding a stable prompt id; default: 'prompt_id' or "
                                 "'id' when present, else the row number")
    split: str = "train"
    limit: int | None = Field(None, ge=1)


class GenerateConfig(StrictModel):
    """`datasteer generate`: k candidates per prompt from each teacher."""

    prompts: PromptsConfig
    teachers: list[TeacherConfig] = Field(..., min_length=1)
    seed: int = 0

    @field_validator("teachers")
    @classmethod
    def _unique_names(cls, teachers: list[TeacherConfig]) -> list[TeacherConfig]:
        names = [t.name for t in teachers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"teacher names must be unique; repeated: {', '.join(dupes)}")
        return teachers


class ScoreConfig(StrictModel):
    """`datasteer score`: one column per metric added to every row of a file."""

    input: str
    metrics: list[str] = Field(..., min_length=1, description="metric specs: mtld, length, "
                               "toxicity[backend=detoxify], judge[model=...], package.module:function")
    text_field: str = "completion"
    prompt_field: str = Field("prompt", description="needed by metrics that read prompts (judge, custom)")
    id_field: str = Field("prompt_id", description="groups samples of one prompt (toxicity EMT / TP)")
    chunk_size: int = Field(256, ge=1, description="rows per resumable unit of work")

    @field_validator("metrics", mode="before")
    @classmethod
    def _split_metrics(cls, value: Any) -> Any:
        # "mtld,toxicity[backend=detoxify,device=cpu]" (a flag or a recipe string) -> one spec per metric
        if isinstance(value, str):
            from datasteer.metrics.base import parse_metrics

            return [str(spec) for spec in parse_metrics(value)]
        return value


def fingerprint(config: BaseModel) -> dict[str, Any]:
    """The part of a config that determines a run's output (operational fields removed)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in OPERATIONAL_FIELDS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(config.model_dump(mode="json"))


def describe_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def build(model: type[BaseModel], data: dict[str, Any], source: str = "config") -> Any:
    """Validate `data` into `model`, turning pydantic's report into a one-line ConfigError."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid {source}: {describe_validation_error(err)}") from None


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into a plain dict (validated by the caller's model)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"recipe {path} is not valid YAML{where}; fix the file and rerun") from None
    if not isinstance(data, dict):
        raise InputError(f"recipe {path} must be a YAML mapping of settings")
    return data
