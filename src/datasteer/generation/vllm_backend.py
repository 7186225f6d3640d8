"""Offline batch generation with vLLM (GPU only; `pip install 'datasteer[vllm]'`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from datasteer.errors import optional_import
from datasteer.chat import chat_messages
from datasteer.generation.base import Completion, TeacherBase, fit_to_context, prompt_lengths
from datasteer.io import Prompt
from datasteer.models import load_tokenizer, materialize, model_shape, parse_spec
from datasteer.runs import derive_seed


class VLLMTeacherConfig(TeacherBase):
    """A local model sampled by vLLM's offline engine (GPU)."""

    backend: Literal["vllm"]
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weights' dtype")
    trust_remote_code: bool = Field(False, description="run the model repository's own code")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one copy of the model is split over (vLLM's "
                                      "tensor_parallel_size); with the ray engine each worker gets that many GPUs, "
                                      "and engine.workers copies run side by side (data parallel)")

    def build(self) -> "VLLMTeacher":
        parse_spec(self.model)
        return VLLMTeacher(self)


class VLLMTeacher:
    """One `generate` call = one `LLM.chat` over the unit's prompts with n=k samples each."""

    def __init__(self, config: VLLMTeacherConfig):
        self.config = config
        self._vllm = optional_import("vllm", "the vllm backend (GPU only)", "pip install 'datasteer[vllm]'")
        self._llm: Any = None
        self._room: int | None = None  # prompt tokens kept with too_long: truncate (None: no cut)

    def check_prompts(self, prompts: list[Prompt]) -> int:
        """Before anything is generated: prompts longer than the context less max_new_tokens are refused (one
        line naming the prompt) or, with too_long: truncate, counted and cut to their end by vLLM
        (`truncate_prompt_tokens`). The chat template is vLLM's `LLM.chat`'s, the tokenizer's own."""
        context = model_shape(self.config.model, trust_remote_code=self.config.trust_remote_code).context
        if not context:
            return 0
        tokenizer = load_tokenizer(self.config.model, trust_remote_code=self.config.trust_remote_code)
        cut = fit_to_context(self.config, prompts, prompt_lengths(tokenizer, prompts, self.config.system_prompt,
                                                                   chat=True), context)
        self._room = context - self.config.sampling.max_new_tokens if cut else None
        return cut

    def load(self) -> None:
        if self._llm is None:
            dtype = "auto" if self.config.dtype == "auto" else self.config.dtype
            tp = self.config.tensor_parallel_size
            # several GPUs: vLLM's own worker processes on the GPUs this process sees (inside a Ray actor those it
            # was given), not Ray placement groups that would wait for GPUs the actor already holds
            parallel = {"tensor_parallel_size": tp, "distributed_executor_backend": "mp"} if tp > 1 else {}
            self._llm = self._vllm.LLM(model=materialize(self.config.model), dtype=dtype,
                                       trust_remote_code=self.config.trust_remote_code, seed=0, **parallel)

    def close(self) -> None:
        self._llm = None

    def generate(self, prompts: list[Prompt], *, seed: int) -> list[list[Completion]]:
        self.load()
        s = self.config.sampling
        params = [
            self._vllm.SamplingParams(
                n=self.config.k,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k if s.top_k is not None else -1,
                max_tokens=s.max_new_tokens,
                seed=derive_seed(seed, p.prompt_id),
                **({"truncate_prompt_tokens": self._room} if self._room else {}),
            )
            for p in prompts
        ]
        conversations = [chat_messages(p.prompt, self.config.system_prompt) for p in prompts]
        outputs = self._llm.chat(conversations, params, use_tqdm=False)
        results = []
        for p, out in zip(prompts, outputs):
            request_seed = derive_seed(seed, p.prompt_id)
            results.append([
                Completion(text=o.text, prompt_tokens=len(out.prompt_token_ids), completion_tokens=len(o.token_ids),
                           finish_reason="length" if o.finish_reason == "length" else "stop", seed=request_seed)
                for o in out.outputs
            ])
        return results
