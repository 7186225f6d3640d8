"""Configuration of `generate`: prompts, one or several teachers, a seed.

A teacher's `backend` picks its config class (a pydantic discriminated union): each backend module
(`transformers_backend`, `openai_backend`, `openai_batch`, `vllm_backend`) defines its config beside its code, and
`BACKENDS` below is the one registry line a new backend adds.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, TypeAdapter, field_validator

from datasteer.config import StrictModel
from datasteer.engines import EngineConfig
from datasteer.generation.base import SamplingConfig, TeacherBase
from datasteer.generation.openai_backend import OpenAITeacherConfig
from datasteer.generation.openai_batch import OpenAIBatchTeacherConfig
from datasteer.generation.transformers_backend import TransformersTeacherConfig
from datasteer.generation.vllm_backend import VLLMTeacherConfig
from datasteer.io import PromptsConfig

BACKENDS: dict[str, type[TeacherBase]] = {
    "transformers": TransformersTeacherConfig,
    "openai": OpenAITeacherConfig,
    "vllm": VLLMTeacherConfig,
    "openai-batch": OpenAIBatchTeacherConfig,
}
DEFAULT_BACKEND = "transformers"


def _backend(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("backend", DEFAULT_BACKEND)
    return getattr(value, "backend", DEFAULT_BACKEND)


TeacherConfig = Annotated[
    Union[tuple(Annotated[cls, Tag(name)] for name, cls in BACKENDS.items())],  # type: ignore[misc]
    Discriminator(_backend, custom_error_type="unknown_backend",
                  custom_error_message=f"backend must be one of {', '.join(BACKENDS)}"),
]
_TEACHER = TypeAdapter(TeacherConfig)


def teacher_config(**fields: Any) -> TeacherBase:
    """A teacher config from keyword arguments, its class chosen by `backend` (default transformers)."""
    return _TEACHER.validate_python(fields)


class GenerateConfig(StrictModel):
    """`datasteer generate`: k candidates per prompt from each teacher."""

    prompts: PromptsConfig
    teachers: list[TeacherConfig] = Field(..., min_length=1, description="one or several teachers")
    seed: int = Field(0, description="run seed; every unit of work is seeded from it and the unit's name")
    output_format: Literal["jsonl", "parquet"] = Field("jsonl", description="candidates file format: jsonl, or "
                                                       "parquet for large runs")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="where units run: local (this process) "
                                 "or ray (operational: not part of the run's identity)")

    @field_validator("teachers")
    @classmethod
    def _unique_names(cls, teachers: list[TeacherBase]) -> list[TeacherBase]:
        names = [t.name for t in teachers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"teacher names must be unique; repeated: {', '.join(dupes)}")
        return teachers


__all__ = ["BACKENDS", "GenerateConfig", "SamplingConfig", "TeacherConfig", "teacher_config"]
