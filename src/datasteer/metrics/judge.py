"""LLM-as-judge: a judge model rates each completion 1-10 for its prompt under a rubric.

    judge                                     embedded SmolLM2 as judge, default rubric, greedy
    judge[model=Qwen/Qwen2.5-7B-Instruct,backend=vllm]
    judge[model=gpt-4o-mini,backend=openai,base_url=https://api.openai.com/v1,api_key_env=OPENAI_API_KEY]
    judge[rubric=Is the answer polite?,column=politeness]

Any generation backend works (the judge is a Teacher with k=1 and greedy decoding). The answer
is parsed robustly ("Rating: 7", "**7/10**", "I would give it an 8.", "Score - 9"); an answer
with no rating in 1-10 is a missing value and is counted (`unparseable`), never a guess.
Inputs too long for a local judge's context window are missing values too (`too_long`):
a judgement of a truncated answer would be a judgement of another answer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from datasteer.config import describe_validation_error
from datasteer.errors import ConfigError
from datasteer.generation.config import teacher_config
from datasteer.io import Prompt
from datasteer.metrics.base import BaseScorer, as_int, register
from datasteer.runs import derive_seed

DEFAULT_RUBRIC = ("How helpful, correct and clear is the response for the instruction? 1 = useless or wrong, "
                  "10 = excellent.")
TEMPLATE = ("Rate the response to the instruction below on a scale from 1 to 10.\n"
            "Rubric: {rubric}\n\n"
            "[Instruction]\n{prompt}\n\n"
            "[Response]\n{completion}\n\n"
            "Reply with one line in the form \"Rating: N\", where N is an integer from 1 to 10.")
SYSTEM_PROMPT = "You are a strict, fair evaluator of answers."

_NUMBER = r"(10|[1-9])(?:\.\d+)?"
_PATTERNS = [
    re.compile(r"(?i)\b(?:rating|score|grade)\b\s*(?:is|of|:|=|-)?\s*\**\s*" + _NUMBER + r"(?!\d)"),
    re.compile(r"(?<![\d.])" + _NUMBER + r"\s*(?:/|out of)\s*10\b", re.I),
    re.compile(r"^\s*\**\s*" + _NUMBER + r"\s*\**\s*(?:[.!]\s*)?$"),
]


def parse_rating(answer: str) -> float:
    """The 1-10 rating in a judge's answer, or NaN if there is none (or several conflicting ones)."""
    for pattern in _PATTERNS:
        found = {int(m.group(1)) for m in pattern.finditer(answer)}
        if len(found) == 1:
            return float(found.pop())
        if len(found) > 1:
            return math.nan
    # Last resort: exactly one standalone number in 1..10 in the whole answer.
    numbers = {int(n) for n in re.findall(r"(?<![\d.])(\d{1,2})(?![\d.]\d)", answer) if 1 <= int(n) <= 10}
    return float(numbers.pop()) if len(numbers) == 1 else math.nan


class JudgeScorer(BaseScorer):
    def __init__(self, model: str = "embedded:smollm2", backend: str = "transformers", rubric: str = DEFAULT_RUBRIC,
                 max_new_tokens: int = 16, base_url: str | None = None, api_key_env: str | None = None,
                 batch_size: int = 8, teacher: Any = None):
        super().__init__(name="judge", higher_is_better=True, batched=True, batch_size=batch_size, needs_prompts=True,
                         description=f"1-10 rating by judge {model} ({backend}) under the rubric: {rubric}")
        self.rubric = rubric
        fields: dict[str, Any] = {
            "name": "judge", "model": model, "backend": backend, "k": 1, "batch_size": batch_size,
            "sampling": {"temperature": 0.0, "max_new_tokens": max_new_tokens}, "system_prompt": SYSTEM_PROMPT}
        if backend == "openai":
            fields.update(base_url=base_url, api_key_env=api_key_env)
        elif base_url is not None or api_key_env is not None:
            raise ConfigError("judge: base_url and api_key_env apply to backend=openai only")
        try:
            self.config = teacher_config(**fields)
        except ValidationError as err:
            raise ConfigError(f"invalid judge metric: {describe_validation_error(err)}") from None
        if teacher is None:
            teacher = self.config.build()
        self._teacher = teacher
        self._loaded = False
        self.unparseable = 0
        self.too_long = 0
        self.answers: list[str] = []  # raw judge answers of the last call, for inspection

    def _context_limit(self) -> tuple[Any, int] | None:
        loaded = getattr(self._teacher, "loaded", None)
        if loaded is None:
            return None
        limit = getattr(loaded.model.config, "max_position_embeddings", None)
        return (loaded.tokenizer, int(limit)) if limit else None

    def score(self, texts: Sequence[str], prompts: Sequence[str] | None = None) -> list[float]:
        if prompts is None or len(prompts) != len(texts):
            raise ConfigError("the judge metric needs the prompt of every row (a prompt column)")
        if not self._loaded:
            self._teacher.load()
            self._loaded = True
        requests = [TEMPLATE.format(rubric=self.rubric, prompt=p, completion=t) for p, t in zip(prompts, texts)]
        keep = list(range(len(requests)))
        limit = self._context_limit()
        if limit is not None:
            tokenizer, max_len = limit
            room = max_len - self.config.sampling.max_new_tokens - 64  # 64: chat template and system prompt
            lengths = [len(ids) for ids in tokenizer(requests, add_special_tokens=False)["input_ids"]]
            keep = [i for i in keep if lengths[i] <= room]
            self.too_long += len(requests) - len(keep)
        out = [math.nan] * len(texts)
        self.answers = [""] * len(texts)
        if keep:
            seed = derive_seed(0, "judge", *requests)  # deterministic even for sampling backends
            answers = self._teacher.generate([Prompt(str(i), requests[i]) for i in keep], seed=seed)
            for i, samples in zip(keep, answers):
                text = samples[0].text
                self.answers[i] = text
                out[i] = parse_rating(text)
                self.unparseable += math.isnan(out[i])
        return out

    def close(self) -> None:
        self._teacher.close()
        self._loaded = False


@register("judge", "an LLM judge's 1-10 rating of each completion for its prompt",
          params=("model", "backend", "rubric", "max_new_tokens", "base_url", "api_key_env", "batch_size"))
def _judge(model: str = "embedded:smollm2", backend: str = "transformers", rubric: str = DEFAULT_RUBRIC,
           max_new_tokens: str = "16", base_url: str | None = None, api_key_env: str | None = None,
           batch_size: str = "8") -> JudgeScorer:
    return JudgeScorer(model=model, backend=backend, rubric=rubric,
                       max_new_tokens=as_int(max_new_tokens, "judge max_new_tokens"), base_url=base_url,
                       api_key_env=api_key_env, batch_size=as_int(batch_size, "judge batch_size"))
