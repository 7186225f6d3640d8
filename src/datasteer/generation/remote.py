"""What the OpenAI-compatible teachers share, whether they answer request by request (`openai`) or as a provider
batch (`openai-batch`): the endpoint and key, the request body, reading a chat completion, prices.

The API key is read from the environment variable named by `api_key_env` when a teacher loads and lives only in
its request headers: never in a config, a manifest, a row, a log line or an error (`datasteer.secrets` masks the
variable's value wherever text leaves the process).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, model_validator

from datasteer.chat import chat_messages
from datasteer.config import StrictModel
from datasteer.errors import ConfigError, TeacherRequestError
from datasteer.generation.base import Completion, TeacherBase
from datasteer.io import Prompt
from datasteer.runs import derive_seed, redact_url
from datasteer.secrets import register_key_env

EMPTY = "empty"  # finish_reason of an answer whose content is null
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class Prices(StrictModel):
    """What a provider charges per million tokens (any currency: the cost estimate is in the same one)."""

    input: float = Field(..., ge=0, description="price per million prompt (input) tokens")
    output: float = Field(..., ge=0, description="price per million completion (output) tokens")


class RemoteTeacherBase(TeacherBase):
    """The fields of every OpenAI-compatible teacher. Timeouts, retries and prices are operational: they may
    change when a run resumes."""

    base_url: str = Field(..., min_length=1, description="endpoint, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field(None, description="name of the environment variable holding the API key; "
                                    "the key itself is never stored")
    timeout_s: float = Field(120.0, gt=0, description="seconds per request")
    max_retries: int = Field(6, ge=0, description="retries of a failed request (backoff, Retry-After)")
    prices: Prices | None = Field(None, description="price per million input and output tokens: the generate "
                                  "summary then estimates the run's cost")

    @model_validator(mode="before")
    @classmethod
    def _needs_base_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("base_url"):
            raise ValueError(f"teacher '{data.get('name')}': the {data.get('backend', 'openai')} backend needs "
                             "base_url (for example http://127.0.0.1:8000/v1)")
        return data


def endpoint(base_url: str, path: str) -> str:
    """base_url + path, a query string (e.g. a provider's ?api-version=) kept after the path."""
    parts = urlsplit(base_url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + path.lstrip("/")))


def describe(config: RemoteTeacherBase) -> str:
    """The teacher in messages: its name and its endpoint without credentials."""
    return f"teacher '{config.name}' at {redact_url(config.base_url)}"


def auth_headers(config: RemoteTeacherBase) -> dict[str, str]:
    """Request headers with the key from `api_key_env` (a one-line ConfigError when the variable is not set)."""
    headers: dict[str, str] = {}
    env = config.api_key_env
    register_key_env(env)
    if env:
        key = os.environ.get(env)
        if not key:
            raise ConfigError(f"teacher '{config.name}': environment variable {env} is not set; "
                              f"export {env}=<your API key>")
        headers["Authorization"] = f"Bearer {key}"
    return headers


def request_seed(unit_seed: int, prompt: Prompt, sample_index: int) -> int:
    """The seed of one request: a function of the unit's seed, the prompt's id and the sample index only."""
    return derive_seed(unit_seed, prompt.prompt_id, sample_index)


def chat_payload(config: TeacherBase, prompt: Prompt, seed: int) -> dict[str, Any]:
    """The body of one chat-completions request (one sample: n=1, its own seed)."""
    s = config.sampling
    payload: dict[str, Any] = {
        "model": config.model,
        "messages": chat_messages(prompt.prompt, config.system_prompt),
        "max_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "n": 1,
        "seed": seed,
    }
    if s.top_k is not None:
        payload["top_k"] = s.top_k  # a common extension (vLLM, llama.cpp); OpenAI ignores unknown fields
    return payload


def parse_completion(body: Any, where: str, seed: int) -> Completion:
    """A chat completion's first choice, with the token counts of its `usage` (0 where the server sends none)."""
    try:
        choice = body["choices"][0]
        content = choice["message"]["content"]
        if content is not None and not isinstance(content, str):
            raise TypeError
        usage = body.get("usage") or {}
        finish = choice.get("finish_reason") or "stop"
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise TeacherRequestError(f"{where} answered with something that is not a chat completion") from None
    return Completion(
        text=content or "",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason=EMPTY if content is None else ("length" if finish == "length" else "stop"),
        seed=seed,
    )
