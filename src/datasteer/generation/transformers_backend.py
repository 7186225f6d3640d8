"""Local generation with transformers: batched sampling, chat templates, left padding, stop at EOS."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from datasteer.chat import encode_prompts
from datasteer.generation.base import Completion, TeacherBase, fit_to_context, prompt_lengths
from datasteer.io import Prompt
from datasteer.models import (
    LoadedModel,
    check_finite_weights,
    config_shape,
    load_model,
    load_tokenizer,
    model_shape,
    parse_spec,
)


class TransformersTeacherConfig(TeacherBase):
    """A local model sampled with transformers (the default backend)."""

    backend: Literal["transformers"] = "transformers"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weights' dtype")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, mps")
    trust_remote_code: bool = Field(False, description="run the model repository's own code")

    def build(self) -> "TransformersTeacher":
        parse_spec(self.model)
        return TransformersTeacher(self)


def eos_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    return sorted(ids)


class TransformersTeacher:
    """The default backend. One `generate` call = one batch of `len(prompts) * k` sequences."""

    def __init__(self, config: TransformersTeacherConfig, loaded: LoadedModel | None = None):
        self.config = config
        self._loaded = loaded
        self._checked = False  # weights checked finite
        self._context: int | None = None  # positions the model has (None: not known yet, or unbounded)

    def load(self) -> None:
        if self._loaded is None:
            self._loaded = load_model(self.config.model, dtype=self.config.dtype, device=self.config.device,
                                      trust_remote_code=self.config.trust_remote_code)
        if not self._checked:  # a diverged fine-tuning's NaN weights would generate empty answers
            check_finite_weights(self._loaded.model, self.config.model)
            self._checked = True

    def context_length(self) -> int | None:
        """The model's positions, from the loaded model's config or, before loading, from the spec's config."""
        if self._loaded is not None:
            return config_shape(self._loaded.model.config).context
        return model_shape(self.config.model, trust_remote_code=self.config.trust_remote_code).context

    def check_prompts(self, prompts: list[Prompt], who: str | None = None, remedy: str | None = None) -> int:
        """Before anything is generated: every prompt's tokens plus max_new_tokens must fit the context (else an
        InputError naming the prompt, or with too_long: truncate the number of prompts whose start is cut)."""
        self._context = self.context_length()
        if not self._context:  # unknown without loading (a hub id offline): loading the model will tell
            return 0
        tokenizer = self._loaded.tokenizer if self._loaded is not None else load_tokenizer(
            self.config.model, trust_remote_code=self.config.trust_remote_code)
        return fit_to_context(self.config, prompts, prompt_lengths(tokenizer, prompts, self.config.system_prompt),
                              self._context, who, remedy)

    @property
    def loaded(self) -> LoadedModel:
        self.load()
        assert self._loaded is not None
        return self._loaded

    def close(self) -> None:
        self._loaded = None

    def generation_config(self) -> Any:
        from transformers import GenerationConfig

        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        s = self.config.sampling
        kwargs: dict[str, Any] = dict(max_new_tokens=s.max_new_tokens, eos_token_id=eos_token_ids(tokenizer, model),
                                      pad_token_id=tokenizer.pad_token_id, num_return_sequences=1)
        if s.greedy:
            kwargs.update(do_sample=False)
        else:
            # top_k=0 switches off transformers' default top-k of 50: no truncation unless asked.
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or 0)
        return GenerationConfig(**kwargs)

    def _fit(self, input_ids: Any, attention_mask: Any, prompts: list[Prompt]) -> tuple[Any, Any]:
        """Left-padded ids as they are when they fit the context; else, with too_long: truncate, the last columns
        (each prompt's end), or the one-line error (a caller that skipped `check_prompts` still never indexes
        past the model's positions)."""
        context = self._context or self.context_length()
        room = context - self.config.sampling.max_new_tokens if context else None
        if room is None or input_ids.shape[1] <= room:
            return input_ids, attention_mask
        if self.config.too_long == "error":
            fit_to_context(self.config, prompts, attention_mask.sum(dim=1).tolist(), context)
        return input_ids[:, -max(room, 1):], attention_mask[:, -max(room, 1):]

    def generate(self, prompts: list[Prompt], *, seed: int) -> list[list[Completion]]:
        import torch

        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        k = self.config.k
        enc = encode_prompts(tokenizer, [p.prompt for p in prompts], self.config.system_prompt)
        input_ids, attention_mask = self._fit(enc["input_ids"], enc["attention_mask"], prompts)
        # Each prompt repeated k times (works for greedy too, where num_return_sequences would not).
        input_ids = input_ids.repeat_interleave(k, dim=0).to(model.device)
        attention_mask = attention_mask.repeat_interleave(k, dim=0).to(model.device)
        devices = [model.device.index or 0] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 generation_config=self.generation_config())
        new_tokens = out[:, input_ids.shape[1]:].tolist()
        prompt_lengths = attention_mask.sum(dim=1).tolist()
        eos = set(eos_token_ids(tokenizer, model))
        results: list[list[Completion]] = []
        for row, tokens in enumerate(new_tokens):
            stop = next((i for i, t in enumerate(tokens) if t in eos), None)
            kept = tokens if stop is None else tokens[:stop]
            completion = Completion(
                text=tokenizer.decode(kept, skip_special_tokens=True),
                prompt_tokens=int(prompt_lengths[row]),
                completion_tokens=len(kept) + (0 if stop is None else 1),  # EOS counts, as in OpenAI usage
                finish_reason="length" if stop is None else "stop",
                seed=seed,
            )
            if row % k == 0:
                results.append([])
            results[-1].append(completion)
        return results
