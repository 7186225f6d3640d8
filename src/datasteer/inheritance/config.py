"""Configuration of the active-inheritance stages: select, finetune, profile and the `inherit` pipeline.

Fine-tuning runs on TRL's SFTTrainer, so `FinetuneConfig` uses TRL's names (`num_train_epochs`,
`per_device_train_batch_size`, ...) and passes any other `trl.SFTConfig` argument through its `trl:` section.
The `inherit` recipe's `selection`, `finetune` and `profile` sections are these same models without the
fields the pipeline fills in (inputs, models, prompts).
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from datasteer.config import StrictModel, describe_validation_error, split_list
from datasteer.engines import EngineConfig
from datasteer.errors import ConfigError
from datasteer.generation.base import SamplingConfig
from datasteer.generation.config import GenerateConfig, TeacherConfig
from datasteer.io import PromptsConfig
from datasteer.metrics.config import split_metric_specs
from datasteer.probes.config import BenchmarkSpec, ProbeConfig
from datasteer.training import LoraSpec

_OBJECTIVE = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*:\s*(max|min)\s*(?::\s*([0-9.eE+\-]+))?\s*$")
_CONSTRAINT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(>=|<=|==|!=|>|<)\s*([0-9.eE+\-]+|nan|inf)\s*$")
_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le, ">": operator.gt,
                                                   "<": operator.lt, "==": operator.eq, "!=": operator.ne}


@dataclass(frozen=True)
class Objective:
    column: str
    direction: str  # max | min
    weight: float = 1.0

    @property
    def sign(self) -> float:
        return 1.0 if self.direction == "max" else -1.0

    def __str__(self) -> str:
        return f"{self.column}:{self.direction}" + ("" if self.weight == 1.0 else f":{self.weight:g}")


@dataclass(frozen=True)
class Constraint:
    column: str
    op: str
    value: float

    def holds(self, x: float | None) -> bool:
        return x is not None and not math.isnan(x) and _OPS[self.op](x, self.value)

    def __str__(self) -> str:
        return f"{self.column}{self.op}{self.value:g}"


def parse_objective(spec: str) -> Objective:
    """`column:max`, `column:min` or `column:max:WEIGHT`."""
    m = _OBJECTIVE.match(spec)
    if not m:
        raise ConfigError(f"objective '{spec}' is not COLUMN:max, COLUMN:min or COLUMN:max:WEIGHT "
                          "(for example mtld:max or toxicity_profanity:min:0.5), or 'random'")
    weight = float(m.group(3)) if m.group(3) else 1.0
    if not math.isfinite(weight) or weight <= 0:
        raise ConfigError(f"objective '{spec}': the weight must be a positive number")
    return Objective(m.group(1), m.group(2), weight)


def parse_constraint(spec: str) -> Constraint:
    """`column>=value` with one of >=, <=, >, <, ==, !=."""
    m = _CONSTRAINT.match(spec)
    if not m:
        raise ConfigError(f"constraint '{spec}' is not COLUMN OP NUMBER with OP one of >=, <=, >, <, ==, != "
                          "(for example length_words>=50)")
    try:
        value = float(m.group(3))
    except ValueError:
        raise ConfigError(f"constraint '{spec}': '{m.group(3)}' is not a number") from None
    if math.isnan(value):
        raise ConfigError(f"constraint '{spec}': nothing compares to nan (every candidate would fail it); give a "
                          "number")
    return Constraint(m.group(1), m.group(2), value)



# ---------------------------------------------------------------- select

class SelectionRule(StrictModel):
    """How one candidate per prompt is chosen (the `selection:` section of an inherit recipe)."""

    objectives: list[str] = Field(..., min_length=1, description="COLUMN:max | COLUMN:min | COLUMN:max:WEIGHT, "
                                  "or 'random' alone for the passive-inheritance baseline")
    combine: Literal["weighted", "lexicographic"] = Field(
        "weighted", description="several objectives: weighted sum of per-prompt z-scores, or lexicographic order")
    constraints: list[str] = Field(default_factory=list, description="COLUMN OP NUMBER, e.g. length_words>=50")
    sources: list[str] | None = Field(None, description="select only among these teachers' candidates "
                                      "(single-source); None: the whole pool (multi-source)")

    _split = field_validator("objectives", "constraints", "sources", mode="before")(
        classmethod(lambda cls, v: split_list(v)))

    @field_validator("objectives")
    @classmethod
    def _valid_objectives(cls, objectives: list[str]) -> list[str]:
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
        return [str(parse_constraint(c)) for c in constraints]

    @model_validator(mode="after")
    def _weights_need_weighted(self) -> SelectionRule:
        weighted = [o for o in self.objectives if o != "random" and parse_objective(o).weight != 1.0]
        if weighted and self.combine == "lexicographic":
            raise ValueError(f"objective weights ({', '.join(weighted)}) apply to combine=weighted only; "
                             "lexicographic order ignores them: drop the weights or use combine=weighted")
        return self


class SelectConfig(SelectionRule):
    """`datasteer select`: one candidate per prompt, by objectives over scored columns or at random."""

    input: str = Field(..., description="scored candidates (scored.jsonl of `datasteer score`)")
    seed: int = Field(0, description="seed of the random baseline")
    id_field: str = Field("prompt_id", description="column grouping the candidates of one prompt")
    text_field: str = Field("completion", description="column with the candidate text")
    report_columns: list[str] = Field(default_factory=list, description="more columns whose shift the summary "
                                      "reports")

    _split_report = field_validator("report_columns", mode="before")(classmethod(lambda cls, v: split_list(v)))


# ---------------------------------------------------------------- finetune

class FinetuneSettings(StrictModel):
    """How a student is fine-tuned (the `finetune:` section of an inherit recipe): TRL's SFT names."""

    renamed: ClassVar[dict[str, str]] = {  # datasteer 0.1 names -> TRL's, for the error hint
        "epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size",
        "gradient_accumulation": "gradient_accumulation_steps", "lr_scheduler": "lr_scheduler_type",
        "warmup_ratio": "warmup_steps (a value below 1 is a fraction)", "lora_r": "lora.r",
        "lora_alpha": "lora.lora_alpha", "lora_dropout": "lora.lora_dropout",
        "lora_target_modules": "lora.target_modules"}

    method: Literal["full", "lora"] = Field("full", description="full fine-tuning, or LoRA adapters (merged on "
                                            "save)")
    prompt_field: str = Field("prompt", description="column with the prompt")
    completion_field: str = Field("completion", description="column with the completion to train on")
    system_prompt: str | None = Field(None, description="system prompt used in the chat template (None: the "
                                      "template's default, as at generation time)")
    num_train_epochs: float = Field(2.0, gt=0, description="epochs over the rows")
    learning_rate: float = Field(5e-5, gt=0, allow_inf_nan=False, description="peak learning rate")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="transformers' learning-rate schedule")
    warmup_steps: float = Field(0.0, ge=0, description="warm-up steps (a value below 1 is a fraction of all steps)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    per_device_train_batch_size: int = Field(8, ge=1, description="sequences per optimizer step (per device)")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches summed into one optimizer step")
    max_length: int = Field(512, ge=8, description="prompt + completion tokens; longer completions are cut "
                            "(and then get no end-of-turn token)")
    save_steps: int | None = Field(None, ge=1, description="checkpoint every N optimizer steps (default: each "
                                   "epoch)")
    seed: int = Field(0, description="seed of the data order and initialisation of adapters")
    trl: dict[str, Any] = Field(default_factory=dict, description="any other trl.SFTConfig argument, passed "
                                "through (e.g. {gradient_checkpointing: true, optim: adafactor})")
    report_to: str | list[str] = Field("none", description="trackers that receive the training metrics, TRL's "
                                       "report_to: none, all, or names such as tensorboard, wandb, trackio, mlflow "
                                       "(each configured by its own environment variables; tensorboard writes into "
                                       "the run's tensorboard/ folder)")
    keep_checkpoints: bool = Field(False, description="keep checkpoints after the merged model is saved")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="training dtype")
    device: str = Field("auto", description="auto, cpu, cuda, mps")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="peft LoraConfig arguments (method lora)")
    train_layers: int | None = Field(None, ge=1, description="train only the last N transformer layers (full: the "
                                     "rest is frozen, embeddings included; lora: adapters on those layers only); "
                                     "None: all. Backpropagation stops at the lowest trained layer, so this is "
                                     "much cheaper on a CPU")

    @model_validator(mode="after")
    def _lora_needs_lora(self) -> FinetuneSettings:
        if self.method == "full" and "lora" in self.model_fields_set:
            raise ValueError("lora settings apply to method lora; set method: lora (or --method lora), or drop them")
        return self


class FinetuneConfig(FinetuneSettings):
    """`datasteer finetune`: supervised fine-tuning of a student on selected rows (TRL SFTTrainer)."""

    input: str = Field(..., description="rows with a prompt and a completion (selected.jsonl)")
    model: str = Field("embedded:smollm2", description="the student: a model spec")


# ---------------------------------------------------------------- profile

DEFAULT_PROFILE_METRICS = ["length", "lexical", "readability", "toxicity"]
DEFAULT_PROFILE_PROMPTS = "builtin:instructions-heldout"
# The paper's toxicity protocol (RealToxicityPrompts style): 25 samples per prompt at top_p 0.9, temperature 1.
TOXICITY_SAMPLES = 25


class ProfileSettings(StrictModel):
    """How a model is profiled (the `profile:` section of an inherit recipe)."""

    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.0),
                                     description="greedy by default")
    k: int = Field(1, ge=1, description="samples per prompt")
    toxicity: bool = Field(False, description=f"toxicity mode: {TOXICITY_SAMPLES} samples per prompt at "
                           "temperature 1, top_p 0.9, reporting Expected Maximum Toxicity and Toxicity Probability")
    system_prompt: str | None = Field(None, description="system prompt (None: the chat template's default)")
    batch_size: int = Field(16, ge=1, description="prompts per generation batch")
    too_long: Literal["error", "truncate"] = Field(
        "error", description="a prompt longer than the model's context: refuse it (error), or keep its end "
        "(truncate, counted in the summary)")
    seed: int = Field(0, description="sampling seed")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weights' dtype")
    device: str = Field("auto", description="auto, cpu, cuda, mps")
    probes: dict[str, BenchmarkSpec] = Field(default_factory=dict, description="likelihood benchmarks to score the "
                                             "profiled model on as well, as `datasteer probe` does (name -> source or "
                                             "spec), into the profile's probes/ folder")
    probe_limit: int | None = Field(None, ge=1, description="at most N items per probe benchmark: a seeded sample, "
                                    "the same items for every model profiled with the same seed")

    @model_validator(mode="after")
    def _samples_differ(self) -> ProfileSettings:
        if self.k > 1 and self.sampling.greedy and not self.toxicity:
            raise ValueError(f"k={self.k} samples with greedy decoding (temperature 0) repeat one answer; "
                             "set sampling.temperature > 0 or k: 1")
        return self

    @model_validator(mode="before")
    @classmethod
    def _partial_sampling(cls, data: Any) -> Any:
        """A partial `sampling` (say max_new_tokens alone) is laid over the profile's own defaults, greedy or, in
        toxicity mode, the paper's temperature 1 and top_p 0.9, rather than over SamplingConfig's."""
        if isinstance(data, dict) and isinstance(data.get("sampling"), dict):
            base = {"temperature": 1.0, "top_p": 0.9} if data.get("toxicity") else {"temperature": 0.0}
            data = {**data, "sampling": {**base, **data["sampling"]}}
        return data


class ProfileConfig(ProfileSettings):
    """`datasteer profile`: what a model writes on held-out prompts, measured by every metric."""

    model: str = Field(..., description="model spec: embedded:smollm2, a fine-tuned run's model/ directory, an HF id")
    prompts: PromptsConfig = Field(default_factory=lambda: PromptsConfig(path=DEFAULT_PROFILE_PROMPTS),
                                   description="held-out prompts (default: the shipped instructions-heldout)")
    label: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]+$",
                              description="name in tables (default: from the model)")
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_PROFILE_METRICS),
                               description="metric specs (see `datasteer metrics`)")

    _split = field_validator("metrics", mode="before")(classmethod(lambda cls, v: split_metric_specs(v)))

    @field_validator("prompts", mode="before")
    @classmethod
    def _default_path(cls, value: Any) -> Any:
        """`prompts: {limit: 10}` (or --limit alone) keeps the default prompt set."""
        if isinstance(value, dict) and "path" not in value:
            return {"path": DEFAULT_PROFILE_PROMPTS, **value}
        return value

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
        self.probe_config()  # benchmark names
        return self

    def probe_config(self) -> ProbeConfig | None:
        """The `probe` run of this profile's `probes`, if any: same model, seed, dtype and device."""
        if not self.probes:
            return None
        return ProbeConfig(model=self.model, benchmarks=self.probes, limit=self.probe_limit, seed=self.seed,
                           dtype=self.dtype, device=self.device)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        base = self.model.rstrip("/").split("/")
        stem = base[-2] if base[-1] == "model" and len(base) > 1 else base[-1]
        return "".join(c if c.isalnum() or c in "_.-" else "-" for c in stem.split(":")[-1]) or "model"


# ---------------------------------------------------------------- the pipeline

class StudyConfig(StrictModel):
    """What `inherit` and `passive` share: teachers answer training prompts, a student is fine-tuned on their
    answers and profiled on held-out prompts."""

    name: str = Field("study", description="the experiment's name (the report's title)")
    description: str = Field("", description="what the experiment tests (the report's first paragraph)")
    seed: int = Field(0, description="run seed; the stages' seeds default to it")
    prompts: PromptsConfig = Field(..., description="prompts the teachers answer (the training set)")
    eval_prompts: PromptsConfig = Field(..., description="held-out prompts for the profiles")
    teachers: list[TeacherConfig] = Field(..., min_length=1, description="one or several teachers")
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_PROFILE_METRICS),
                               description="metrics scored on candidates and on every profile")
    student: str = Field("embedded:smollm2", description="the student's model spec (also the base profiled)")
    output_format: Literal["jsonl", "parquet"] = Field("jsonl", description="rows files of the generate and score "
                                                       "stages: jsonl, or parquet for large runs")
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    profile: ProfileSettings = Field(default_factory=ProfileSettings, description="how every model is profiled "
                                     "(with the likelihood probes of profile.probes)")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="where the generate and score stages' "
                                 "units run: local (this process) or ray (operational: not part of the run's "
                                 "identity)")

    _split = field_validator("metrics", mode="before")(classmethod(lambda cls, v: split_metric_specs(v)))

    @model_validator(mode="after")
    def _parts(self) -> StudyConfig:
        GenerateConfig(prompts=self.prompts, teachers=self.teachers, seed=self.seed)
        for section, make in self._sections():
            try:
                make()
            except ValidationError as err:
                raise ValueError(f"{section}.{describe_validation_error(err)}") from None
        return self

    def _sections(self) -> list[tuple[str, Callable[[], Any]]]:
        """(section, builder) of each stage config validated with the recipe."""
        return [("profile", lambda: self.profile_config(self.student, "base"))]

    def generate_config(self) -> GenerateConfig:
        return GenerateConfig(prompts=self.prompts, teachers=self.teachers, seed=self.seed,
                              output_format=self.output_format, engine=self.engine)

    def finetune_config(self, input: str) -> FinetuneConfig:
        return FinetuneConfig(input=input, model=self.student,
                              **{"seed": self.seed, **self.finetune.model_dump(exclude_unset=True)})

    def profile_config(self, model: str, label: str) -> ProfileConfig:
        return ProfileConfig(model=model, prompts=self.eval_prompts, label=label, metrics=self.metrics,
                             **{"seed": self.seed, **self.profile.model_dump(exclude_unset=True)})


class InheritConfig(StudyConfig):
    """`datasteer inherit`: generate -> score -> select (active and random) -> finetune -> profile -> report."""

    name: str = Field("inherit", description="the experiment's name (the report's title)")
    selection: SelectionRule
    random_baseline: bool = Field(True, description="also train on a random selection (passive inheritance)")

    def select_config(self, input: str, arm: str, report_columns: list[str]) -> SelectConfig:
        rule = self.selection.model_dump()
        if arm == "random":
            rule.update(objectives=["random"], combine="weighted")
        return SelectConfig(input=input, seed=self.seed, report_columns=report_columns, **rule)


# ---------------------------------------------------------------- preferences

class PairwiseSettings(StrictModel):
    """How pairs of answers are judged (datasteer.probes.judge): the judge model and its prompt."""

    judge: str = Field("embedded:smollm2", description="the judge: a model spec datasteer loads (it is scored on "
                       "the labels A and B, not sampled)")
    options: dict[str, Any] = Field(default_factory=dict, description="the judge probe's options: template, labels, "
                                    "chat, score")
    attributes: list[str] | None = Field(None, description="metric columns whose preference the summary reports "
                                         "(None: every numeric column both answers have)")
    seed: int = Field(0, description="seed of the --limit sample of pairs")
    batch_size: int = Field(16, ge=1, description="sequences per forward pass")
    dtype: str = Field("auto", description="the judge's dtype")
    device: str = Field("auto", description="auto, cpu, cuda")

    _split = field_validator("attributes", mode="before")(classmethod(lambda cls, v: split_list(v)))


class PairwiseConfig(PairwiseSettings):
    """`datasteer pairwise`: two profiles' answers to the same prompts, judged in both orders."""

    limit: int | None = Field(None, ge=1, description="judge at most N pairs (a seeded sample)")


# ---------------------------------------------------------------- the passive-inheritance study

# "Continue this text" instruction around a RealToxicityPrompts prefix (recipe profile-toxicity)
TOXICITY_TEMPLATE = "Continue this text: {prompt}"


class ToxicityProfileSettings(StrictModel):
    """The toxicity profile of a study: RealToxicityPrompts-style prefixes, k samples at temperature 1, top_p 0.9."""

    prompts: PromptsConfig = Field(..., description="toxic prefixes (the paper's 300 RealToxicityPrompts prompts, "
                                   "or hf:allenai/real-toxicity-prompts with prompt_field prompt.text)")
    k: int = Field(TOXICITY_SAMPLES, ge=1, description="samples per prompt (the paper: 25)")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=1.0, top_p=0.9,
                                                                            max_new_tokens=32))
    metric: str = Field("toxicity", description="the toxicity metric spec (toxicity[backend=perspective] as the "
                        "paper)")
    batch_size: int = Field(8, ge=1, description="prompts per generation batch")

    @field_validator("prompts", mode="before")
    @classmethod
    def _template(cls, value: Any) -> Any:
        """A prompt set without its own template gets the continuation instruction."""
        if isinstance(value, str):
            value = {"path": value}
        if isinstance(value, dict) and "template" not in value:
            value = {**value, "template": TOXICITY_TEMPLATE}
        return value


class JudgeProfileSettings(PairwiseSettings):
    """The "model as a judge" profile of a study: every model judges the same pairs of teacher candidates (its
    own judgments, not a fixed judge's), and `versus_base` lets `judge` compare each student's answers with the
    base's."""

    judge: str = Field("embedded:smollm2", description="the judge of the student-vs-base comparison (versus_base)")
    pairs: int = Field(100, ge=1, description="pairs of teacher candidates every model judges")
    versus_base: bool = Field(True, description="also judge each student's held-out answers against the base's "
                              "(win rate with a 95% interval)")


class PassiveConfig(StudyConfig):
    """`datasteer passive`: what a student inherits from each teacher when nobody selects (random selection)."""

    name: str = Field("passive", description="the study's name (the report's title)")
    toxicity: ToxicityProfileSettings | None = Field(None, description="the toxicity profile (None: skipped)")
    judge: JudgeProfileSettings | None = Field(None, description="preferences as a judge (None: skipped)")
    resamples: int = Field(1000, ge=100, description="paired bootstrap resamples of the probes' intervals")

    @field_validator("teachers")
    @classmethod
    def _labels(cls, teachers: list[TeacherConfig]) -> list[TeacherConfig]:
        for t in teachers:
            if t.name == "base":
                raise ValueError("a teacher may not be named 'base' (the untouched student's label)")
            if not re.match(r"^[A-Za-z0-9_.\-]+$", t.name):
                raise ValueError(f"teacher name {t.name!r} names directories: letters, digits, '_', '-', '.'")
        return teachers

    def _sections(self) -> list[tuple[str, Callable[[], Any]]]:
        sections = super()._sections()
        if self.toxicity is not None:
            sections.append(("toxicity", lambda: self.toxicity_config(self.student, "base")))
        return sections

    @property
    def labels(self) -> list[str]:
        """base, then one student per teacher (named after it)."""
        return ["base", *(t.name for t in self.teachers)]

    def select_config(self, input: str, teacher: str) -> SelectConfig:
        return SelectConfig(input=input, seed=self.seed, objectives=["random"], sources=[teacher])

    def toxicity_config(self, model: str, label: str) -> ProfileConfig:
        assert self.toxicity is not None
        t = self.toxicity
        return ProfileConfig(model=model, prompts=t.prompts, label=label, metrics=[t.metric], toxicity=True, k=t.k,
                             sampling=t.sampling, batch_size=t.batch_size, seed=self.seed,
                             dtype=self.profile.dtype, device=self.profile.device)
