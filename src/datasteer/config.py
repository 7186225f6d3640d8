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

    _split = field_validator("metrics", mode="before")(classmethod(lambda cls, v: split_metric_specs(v)))


def split_metric_specs(value: Any) -> Any:
    """"mtld,toxicity[backend=detoxify,device=cpu]" (a flag or a recipe string) -> one spec per metric."""
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
        from datasteer.recipes import RECIPES_DIR

        if len(path.parts) == 1 and path.suffix in ("", ".yaml"):
            builtin = RECIPES_DIR / f"{path.stem}.yaml"
            if builtin.is_file():
                return load_recipe(builtin)
        available = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise InputError(f"recipe not found: {path} (a file path, or a built-in name: {available})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"recipe {path} is not valid YAML{where}; fix the file and rerun") from None
    if not isinstance(data, dict):
        raise InputError(f"recipe {path} must be a YAML mapping of settings")
    return data


def _split_list(value: Any) -> Any:
    """'a,b' (a flag or a recipe string) -> ['a', 'b']."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class SelectConfig(StrictModel):
    """`datasteer select`: one candidate per prompt, by objectives over scored columns or at random."""

    input: str
    objectives: list[str] = Field(..., min_length=1, description="COLUMN:max | COLUMN:min | COLUMN:max:WEIGHT, "
                                  "or 'random' alone for the passive-inheritance baseline")
    combine: Literal["weighted", "lexicographic"] = Field(
        "weighted", description="several objectives: weighted sum of per-prompt z-scores, or lexicographic order")
    constraints: list[str] = Field(default_factory=list, description="COLUMN OP NUMBER, e.g. length>=50")
    sources: list[str] | None = Field(None, description="select only among these teachers' candidates "
                                      "(single-source); None: the whole pool (multi-source)")
    seed: int = 0
    id_field: str = "prompt_id"
    text_field: str = "completion"
    report_columns: list[str] = Field(default_factory=list, description="more columns whose shift the summary reports")

    _split = field_validator("objectives", "constraints", "report_columns", "sources", mode="before")(
        classmethod(lambda cls, v: _split_list(v)))

    @field_validator("objectives")
    @classmethod
    def _valid_objectives(cls, objectives: list[str]) -> list[str]:
        from datasteer.inheritance.select import parse_objective

        if "random" in objectives:
            if len(objectives) > 1:
                raise ValueError("'random' selection cannot be combined with other objectives")
            return objectives
        parsed = [parse_objective(o) for o in objectives]
        columns = [o.column for o in parsed]
        if len(set(columns)) != len(columns):
            raise ValueError(f"an objective column is repeated: {columns}")
        return [str(o) for o in parsed]

    @field_validator("constraints")
    @classmethod
    def _valid_constraints(cls, constraints: list[str]) -> list[str]:
        from datasteer.inheritance.select import parse_constraint

        return [str(parse_constraint(c)) for c in constraints]


class FinetuneConfig(StrictModel):
    """`datasteer finetune`: supervised fine-tuning of a student on selected rows (TRL SFTTrainer)."""

    input: str = Field(..., description="rows with a prompt and a completion (selected.jsonl)")
    model: str = Field("embedded:smollm2", description="the student: a model spec")
    method: Literal["full", "lora"] = "full"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    system_prompt: str | None = Field(None, description="system prompt used in the chat template (None: the "
                                      "template's default, as at generation time)")
    epochs: float = Field(2.0, gt=0)
    learning_rate: float = Field(5e-5, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1, description="sequences per optimizer step (per device)")
    gradient_accumulation: int = Field(1, ge=1)
    max_length: int = Field(512, ge=8, description="prompt + completion tokens; longer completions are cut "
                            "(and then get no end-of-turn token)")
    save_steps: int | None = Field(None, ge=1, description="checkpoint every N optimizer steps (default: each epoch)")
    keep_checkpoints: bool = Field(False, description="keep checkpoints after the merged model is saved")
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "auto"
    # LoRA
    lora_r: int = Field(16, ge=1)
    lora_alpha: float = Field(32.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] | str = Field("all-linear", description="module names, or 'all-linear'")
    train_layers: int | None = Field(None, ge=1, description="train only the last N transformer layers (full: the "
                                     "rest is frozen, embeddings included; lora: adapters on those layers only); "
                                     "None: all. Backpropagation stops at the lowest trained layer, so this is "
                                     "much cheaper on a CPU")


DEFAULT_PROFILE_METRICS = ["length", "lexical", "readability", "toxicity"]
# The paper's toxicity protocol (RealToxicityPrompts style): 25 samples per prompt at top_p 0.9, temperature 1.
TOXICITY_SAMPLES = 25


class ProfileConfig(StrictModel):
    """`datasteer profile`: what a model writes on held-out prompts, measured by every metric."""

    model: str = Field(..., description="model spec: embedded:smollm2, a fine-tuned run's model/ directory, an HF id")
    prompts: PromptsConfig
    label: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]+$",
                              description="name in tables (default: from the model)")
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_PROFILE_METRICS))
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.0))
    k: int = Field(1, ge=1, description="samples per prompt")
    toxicity: bool = Field(False, description=f"toxicity mode: {TOXICITY_SAMPLES} samples per prompt at "
                           "temperature 1, top_p 0.9, reporting Expected Maximum Toxicity and Toxicity Probability")
    system_prompt: str | None = None
    batch_size: int = Field(16, ge=1)
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"

    _split = field_validator("metrics", mode="before")(classmethod(lambda cls, v: split_metric_specs(v)))

    @model_validator(mode="after")
    def _toxicity_mode(self) -> ProfileConfig:
        # validate_assignment would re-enter this validator: set fields with object.__setattr__
        if self.toxicity:
            if "k" not in self.model_fields_set:
                object.__setattr__(self, "k", TOXICITY_SAMPLES)
            if "sampling" not in self.model_fields_set:
                object.__setattr__(self, "sampling", SamplingConfig(temperature=1.0, top_p=0.9,
                                                                    max_new_tokens=self.sampling.max_new_tokens))
            if not any(m.split("[")[0] == "toxicity" for m in self.metrics):
                object.__setattr__(self, "metrics", [*self.metrics, "toxicity"])
        if self.k > 1 and self.sampling.greedy:
            raise ValueError(f"k={self.k} samples with greedy decoding (temperature 0) repeat one answer; "
                             "set sampling.temperature > 0 or k: 1")
        return self

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        base = self.model.rstrip("/").split("/")
        stem = base[-2] if base[-1] == "model" and len(base) > 1 else base[-1]
        return "".join(c if c.isalnum() or c in "_.-" else "-" for c in stem.split(":")[-1]) or "model"


class SelectionSpec(StrictModel):
    """The selection part of an `inherit` recipe (SelectConfig without its input)."""

    objectives: list[str] = Field(..., min_length=1)
    combine: Literal["weighted", "lexicographic"] = "weighted"
    constraints: list[str] = Field(default_factory=list)
    sources: list[str] | None = None

    _split = field_validator("objectives", "constraints", "sources", mode="before")(
        classmethod(lambda cls, v: _split_list(v)))


class InheritConfig(StrictModel):
    """`datasteer inherit`: generate -> score -> select (active and random) -> finetune -> profile -> report."""

    name: str = "inherit"
    description: str = ""
    seed: int = 0
    prompts: PromptsConfig = Field(..., description="prompts the teachers answer (the training set)")
    eval_prompts: PromptsConfig = Field(..., description="held-out prompts for the profiles")
    teachers: list[TeacherConfig] = Field(..., min_length=1)
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_PROFILE_METRICS),
                               description="metrics scored on candidates and on every profile")
    selection: SelectionSpec
    random_baseline: bool = Field(True, description="also train on a random selection (passive inheritance)")
    student: str = "embedded:smollm2"
    finetune: dict[str, Any] = Field(default_factory=dict, description="FinetuneConfig fields (not input/model)")
    profile: dict[str, Any] = Field(default_factory=dict, description="ProfileConfig fields (not model/prompts)")

    _split = field_validator("metrics", mode="before")(classmethod(lambda cls, v: split_metric_specs(v)))

    @model_validator(mode="after")
    def _parts(self) -> InheritConfig:
        GenerateConfig(prompts=self.prompts, teachers=self.teachers, seed=self.seed)
        SelectConfig(input="-", **self.selection.model_dump())
        for key in ("input", "model"):
            if key in self.finetune:
                raise ValueError(f"finetune.{key} is set by the pipeline; use 'student' for the model")
        for key in ("model", "prompts", "metrics"):
            if key in self.profile:
                raise ValueError(f"profile.{key} is set by the pipeline (student, eval_prompts, metrics)")
        for section, make in (("finetune", lambda: self.finetune_config("-")),
                              ("profile", lambda: self.profile_config(self.student, "base"))):
            try:
                make()
            except ValidationError as err:
                raise ValueError(f"{section}.{describe_validation_error(err)}") from None
        return self

    def finetune_config(self, input: str) -> FinetuneConfig:
        return FinetuneConfig(input=input, model=self.student, **{"seed": self.seed, **self.finetune})

    def profile_config(self, model: str, label: str) -> ProfileConfig:
        return ProfileConfig(model=model, prompts=self.eval_prompts, label=label, metrics=self.metrics,
                             **{"seed": self.seed, **self.profile})
