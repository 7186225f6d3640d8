"""Local generation with transformers: batched sampling, chat templates, left padding, stop at EOS."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from datasteer.chat import encode_prompts
from datasteer.generation.base import Completion, TeacherBase
from datasteer.io import Prompt
from datasteer.models import LoadedModel, load_model, parse_spec


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

    def load(self) -> None:
        if self._loaded is None:
            self._loaded = load_model(self.config.model, dtype=self.config.dtype, device=self.config.device,
                                      trust_remote_code=self.config.trust_remote_code)

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

    def generate(self, prompts: list[Prompt], *, seed: int) -> list[list[Completion]]:
        import torch

        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        k = self.config.k
        enc = encode_prompts(tokenizer, [p.prompt for p in prompts], self.config.system_prompt)
        # Each prompt repeated k times (works for greedy too, where num_return_sequences would not).
        input_ids = enc["input_ids"].repeat_interleave(k, dim=0).to(model.device)
        attention_mask = enc["attention_mask"].repeat_interleave(k, dim=0).to(model.device)
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
