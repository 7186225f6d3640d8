"""The generator's side of a DPG run: what can fail before it loads, whether its prompts go through the chat
template, and its alphabet (`allowed_tokens`, applied as a frozen LM-head bias)."""

from __future__ import annotations

from typing import Any

import torch

from datasteer.dpg.config import DPGConfig, GeneratorSpec
from datasteer.dpg.grpo import check_grpo_section
from datasteer.dpg.targets import LMHeadPattern, Target, printable_token_ids
from datasteer.errors import ConfigError, InputError, optional_import


def check_generator(config: DPGConfig) -> None:
    """The generator's options that can fail before a model loads: TRL (and LoRA, vLLM) installed, LoRA arguments,
    the `grpo.trl` pass-through."""
    optional_import("trl", "datasteer dpg (GRPO through TRL)", "pip install 'datasteer[train]'")
    check_grpo_section(config.grpo)
    if config.generator.lora is not None:
        optional_import("peft", "a LoRA generator", "pip install 'datasteer[train]'")
        try:
            config.generator.lora.peft_config()
        except ConfigError as err:
            raise ConfigError(f"generator.{err}") from None
    if config.grpo.use_vllm:
        optional_import("vllm", "grpo.use_vllm", "pip install 'datasteer[vllm]'")


def use_chat(spec: GeneratorSpec, tokenizer: Any) -> bool:
    """Whether prompts go through the chat template: `generator.chat`, or by default when there is one."""
    if spec.chat is not None:
        if spec.chat and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("generator.chat is true but the generator's tokenizer has no chat template")
        return spec.chat
    return bool(getattr(tokenizer, "chat_template", None))


def allowed_token_ids(allowed: str | list[str], tokenizer: Any, eos: bool = True) -> list[int] | None:
    """None for 'all'; else the ids the generator may write, with EOS (so that it can stop) unless `eos` is False."""
    if allowed == "all":
        return None
    if allowed == "printable":
        ids = printable_token_ids(tokenizer)
    else:
        ids = []
        for piece in allowed:
            found = tokenizer(piece, add_special_tokens=False)["input_ids"]
            if len(found) != 1:
                raise InputError(f"allowed token {piece!r} is {len(found)} tokens for this tokenizer, not one")
            ids.append(found[0])
    if eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def restrict_vocabulary(model: torch.nn.Module, token_ids: list[int]) -> None:
    """Give the output layer a frozen bias of 0 on `token_ids` and -1e9 elsewhere.

    A bias rather than a hook: TRL scores the policy with its own fused LM-head kernel (hidden states times
    `lm_head.weight`, plus `lm_head.bias`), which bypasses forward hooks, so only a bias reaches sampling and
    the policy's log-probabilities (and their gradient) alike. A large finite value rather than -inf keeps
    p * log p at 0 for the excluded tokens, so entropies stay finite. Architectures without an LM-head bias
    drop it when the saved generator is loaded again: apply the same restriction when sampling from it.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ConfigError("allowed_tokens needs a generator whose output layer is a torch.nn.Linear")
    weight = head.weight
    penalty = max(-1e9, torch.finfo(weight.dtype).min / 4)  # float16 cannot hold -1e9
    bias = torch.full((weight.shape[0],), penalty, dtype=weight.dtype, device=weight.device)
    bias[torch.as_tensor(token_ids, device=weight.device)] = 0.0
    if head.bias is not None:
        bias = bias + head.bias.detach()
    head.bias = torch.nn.Parameter(bias, requires_grad=False)


def restrict_alphabet(spec: GeneratorSpec, model: torch.nn.Module, tokenizer: Any, target: Target,
                      target_tokenizer: Any) -> None:
    """Apply `generator.allowed_tokens` to the loaded generator; a pattern target's rows must stay writable."""
    allowed = allowed_token_ids(spec.allowed_tokens, tokenizer, spec.allow_eos)
    if allowed is None:
        return
    restrict_vocabulary(model, allowed)
    if isinstance(target, LMHeadPattern):
        target.check_writable(target_tokenizer, {tokenizer.decode([i]) for i in allowed})
