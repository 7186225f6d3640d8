"""The Teacher protocol: what every generation backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pydantic import Field

from datasteer.config import StrictModel
from datasteer.io import Prompt


class SamplingConfig(StrictModel):
    """Sampling parameters. temperature 0 means greedy decoding."""

    temperature: float = Field(1.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int | None = Field(None, ge=1, description="None: no top-k truncation")
    max_new_tokens: int = Field(256, ge=1, description="tokens per completion at most")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class TeacherBase(StrictModel):
    """What every teacher has, whatever its backend: a name, a model, k samples, sampling, a system prompt.

    Each backend module subclasses it with its own fields and a `backend` literal (the discriminator of
    `generation.config.TeacherConfig`), and `build()` returns the backend's `Teacher`.
    """

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$", description="the teacher's name (the "
                      "rows' `source`)")
    model: str = Field(..., min_length=1, description="model spec (embedded:smollm2, HF id, local dir, tiny:llama) "
                       "or, for the openai backend, the model name the server expects")
    k: int = Field(1, ge=1, description="candidates per prompt from this teacher")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    system_prompt: str | None = Field(None, description="system prompt (None: the chat template's default)")
    batch_size: int = Field(8, ge=1, description="prompts per generation batch (one resumable unit of work)")

    def build(self) -> "Teacher":
        raise NotImplementedError


@dataclass(frozen=True)
class Completion:
    """One sampled answer. finish_reason is 'stop' (EOS or stop sequence) or 'length' (hit max_new_tokens)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    seed: int


@runtime_checkable
class Teacher(Protocol):
    """A source of candidates. `generate` returns, for each prompt, `config.k` completions.

    The result must depend only on (prompts, seed, config): that is what makes a resumed run
    byte-identical to an uninterrupted one.
    """

    config: TeacherBase

    def load(self) -> None: ...

    def generate(self, prompts: list[Prompt], *, seed: int) -> list[list[Completion]]: ...

    def close(self) -> None: ...
