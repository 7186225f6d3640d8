"""The Teacher protocol: what every generation backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import Field

from datasteer.config import StrictModel
from datasteer.errors import InputError
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
    too_long: Literal["error", "truncate"] = Field(
        "error", description="a prompt whose tokens plus max_new_tokens exceed the model's context: error (refused "
        "before anything is generated) or truncate (keep the prompt's end; counted in the summary)")

    def build(self) -> "Teacher":
        raise NotImplementedError


def prompt_lengths(tokenizer: Any, prompts: list[Prompt], system_prompt: str | None, chat: bool | None = None,
                   chunk: int = 256) -> list[int]:
    """Tokens of every prompt as generation renders it (`encode_prompts`), without padding."""
    from datasteer.chat import encode_prompts

    side = getattr(tokenizer, "padding_side", None)
    lengths: list[int] = []
    try:
        for start in range(0, len(prompts), chunk):
            enc = encode_prompts(tokenizer, [p.prompt for p in prompts[start:start + chunk]], system_prompt, chat)
            lengths.extend(int(n) for n in enc["attention_mask"].sum(dim=1).tolist())
    finally:
        if side is not None:
            tokenizer.padding_side = side
    return lengths


def fit_to_context(teacher: TeacherBase, prompts: list[Prompt], lengths: list[int], context: int | None,
                   who: str | None = None, remedy: str | None = None) -> int:
    """How many prompts must be cut to fit `context` with `max_new_tokens` after them (0 when context is unknown).
    With `too_long: error` (the default) the first such prompt is a one-line InputError naming it (`who` runs
    the model, `remedy` says what to do: by default the teacher and its settings)."""
    who = who or f"teacher '{teacher.name}'"
    remedy = remedy or ("shorten it, lower max_new_tokens, or set the teacher's too_long: truncate to keep each "
                        "prompt's end")
    if not context:
        return 0
    new = teacher.sampling.max_new_tokens
    room = context - new
    if room < 1:
        raise InputError(f"{who}: max_new_tokens={new} leaves no room for a prompt in the {context}-token context "
                         f"of {teacher.model}; lower sampling.max_new_tokens")
    over = [(p, n) for p, n in zip(prompts, lengths) if n > room]
    if over and teacher.too_long == "error":
        p, n = over[0]
        more = f" ({len(over) - 1} more)" if len(over) > 1 else ""
        raise InputError(f"prompt '{p.prompt_id}' is {n} tokens, and with max_new_tokens={new} exceeds the "
                         f"{context}-token context of {teacher.model} ({who}){more}; {remedy}")
    return len(over)


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


# A teacher may also offer `check_prompts(prompts) -> int`: called by `generate` for every teacher before any unit
# runs, it refuses prompts too long for the model's context (an InputError) or returns how many it will truncate.
