"""Any OpenAI-compatible chat-completions endpoint: a remote provider, a vLLM or llama.cpp server,
`transformers serve`.

Requests run concurrently (up to `concurrency` in flight), retry with exponential backoff on
429, 5xx, timeouts and dropped connections (honouring Retry-After), and carry a per-request
seed derived from the unit seed, so servers that honour `seed` give reproducible samples.
The API key is read from the environment variable named by `api_key_env` and lives only in
the request header: it is never stored in the config, the manifest, the rows or an error (server error
texts and URLs pass through `datasteer.secrets`).

Each retry is one warning line (logger `datasteer.generation.openai`; the CLI prints it on stderr) with the
attempt count and the reason, so a server that never answers is visible. An answer whose `content` is null
becomes an empty completion with finish_reason "empty", counted in the generate summary's `finish_reasons`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, model_validator

from datasteer.errors import ConfigError, TeacherRequestError, optional_import
from datasteer.chat import chat_messages
from datasteer.generation.base import Completion, TeacherBase
from datasteer.io import Prompt
from datasteer.retry import retry_delay, server_message
from datasteer.runs import derive_seed, redact_url
from datasteer.secrets import redact_text, register_key_env

log = logging.getLogger("datasteer.generation.openai")
EMPTY = "empty"  # finish_reason of an answer whose content is null
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class OpenAITeacherConfig(TeacherBase):
    """Any OpenAI-compatible chat-completions endpoint (a provider, a vLLM or llama.cpp server, `transformers
    serve`). Requests in flight, timeouts and retries are operational: they may change when a run resumes."""

    backend: Literal["openai"]
    base_url: str = Field(..., min_length=1, description="endpoint, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field(None, description="name of the environment variable holding the API key; "
                                    "the key itself is never stored")
    concurrency: int = Field(8, ge=1, description="requests in flight")
    timeout_s: float = Field(120.0, gt=0, description="seconds per request")
    max_retries: int = Field(6, ge=0, description="retries of a failed request (backoff, Retry-After)")

    @model_validator(mode="before")
    @classmethod
    def _needs_base_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("base_url"):
            raise ValueError(f"teacher '{data.get('name')}': the openai backend needs base_url (for example "
                             "http://127.0.0.1:8000/v1)")
        return data

    def build(self) -> "OpenAITeacher":
        return OpenAITeacher(self)


class OpenAITeacher:
    def __init__(self, config: OpenAITeacherConfig, *, transport: Any = None, sleep: Any = asyncio.sleep):
        self.config = config
        self._httpx = optional_import("httpx", "the openai backend", "pip install 'datasteer[openai]'")
        self._transport = transport  # tests inject httpx.MockTransport for failure injection
        self._sleep = sleep
        self._headers: dict[str, str] | None = None

    @property
    def url(self) -> str:
        """base_url + /chat/completions, a query string (e.g. a provider's ?api-version=) kept after the path."""
        assert self.config.base_url
        parts = urlsplit(self.config.base_url)
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/chat/completions"))

    def load(self) -> None:
        headers = {"Content-Type": "application/json"}
        env = self.config.api_key_env
        register_key_env(env)
        if env:
            key = os.environ.get(env)
            if not key:
                raise ConfigError(f"teacher '{self.config.name}': environment variable {env} is not set; "
                                  f"export {env}=<your API key>")
            headers["Authorization"] = f"Bearer {key}"
        self._headers = headers

    def close(self) -> None:
        self._headers = None

    def _payload(self, prompt: Prompt, seed: int) -> dict[str, Any]:
        s = self.config.sampling
        payload: dict[str, Any] = {
            "model": self.config.model,
            "messages": chat_messages(prompt.prompt, self.config.system_prompt),
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "n": 1,
            "seed": seed,
        }
        if s.top_k is not None:
            payload["top_k"] = s.top_k  # a common extension (vLLM, llama.cpp); OpenAI ignores unknown fields
        return payload

    def generate(self, prompts: list[Prompt], *, seed: int) -> list[list[Completion]]:
        if self._headers is None:
            self.load()
        return asyncio.run(self._generate(prompts, seed))

    async def _generate(self, prompts: list[Prompt], seed: int) -> list[list[Completion]]:
        httpx = self._httpx
        limit = asyncio.Semaphore(self.config.concurrency)
        timeout = httpx.Timeout(self.config.timeout_s)
        async with httpx.AsyncClient(timeout=timeout, headers=self._headers, transport=self._transport) as client:

            async def one(prompt: Prompt, sample_index: int) -> Completion:
                request_seed = derive_seed(seed, prompt.prompt_id, sample_index)
                async with limit:
                    return await self._request(client, self._payload(prompt, request_seed), request_seed)

            tasks = [[asyncio.ensure_future(one(p, j)) for j in range(self.config.k)] for p in prompts]
            try:
                return [[await t for t in row] for row in tasks]
            finally:
                for row in tasks:
                    for t in row:
                        t.cancel()

    async def _request(self, client: Any, payload: dict[str, Any], seed: int) -> Completion:
        httpx = self._httpx
        where = f"teacher '{self.config.name}' at {redact_url(self.config.base_url)}"
        last = ""
        for attempt in range(self.config.max_retries + 1):
            response = None
            try:
                response = await client.post(self.url, json=payload)
            except httpx.TimeoutException as err:
                last = f"{type(err).__name__} after {self.config.timeout_s:g}s"
            except httpx.TransportError as err:
                last = f"{type(err).__name__}"
            else:
                if response.status_code == 200:
                    return _parse_completion(response, where, seed)
                last = f"HTTP {response.status_code}: {server_message(response)}"
                if response.status_code not in RETRY_STATUS:
                    raise TeacherRequestError(f"{where} refused the request ({last}); check the model name, "
                                              "key and parameters")
            if attempt < self.config.max_retries:
                delay = retry_delay(attempt, response)
                log.warning(redact_text(f"{where}: {last}; retry {attempt + 1} of {self.config.max_retries} in "
                                        f"{delay:.1f}s"))
                await self._sleep(delay)
        raise TeacherRequestError(f"{where} kept failing after {self.config.max_retries} retries ({last}); "
                                  "finished batches are saved: rerun the same command to resume")




def _parse_completion(response: Any, where: str, seed: int) -> Completion:
    try:
        body = response.json()
        choice = body["choices"][0]
        content = choice["message"]["content"]
        if content is not None and not isinstance(content, str):
            raise TypeError
        usage = body.get("usage") or {}
        finish = choice.get("finish_reason") or "stop"
    except (ValueError, KeyError, IndexError, TypeError):
        raise TeacherRequestError(f"{where} answered with something that is not a chat completion") from None
    return Completion(
        text=content or "",
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        finish_reason=EMPTY if content is None else ("length" if finish == "length" else "stop"),
        seed=seed,
    )
