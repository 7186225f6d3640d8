"""The Teacher protocol: what every generation backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from datasteer.config import TeacherConfig
from datasteer.io import Prompt


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

    config: TeacherConfig

    def load(self) -> None: ...

    def generate(self, prompts: list[Prompt], *, seed: int) -> list[list[Completion]]: ...

    def close(self) -> None: ...


def chat_messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return messages


def plain_prompt(prompt: str, system_prompt: str | None) -> str:
    """A prompt for a model used without its chat template: the system prompt, a blank line, the prompt."""
    return f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
