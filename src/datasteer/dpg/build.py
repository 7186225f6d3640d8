"""Turn a recipe's target section into a `Target` on a loaded model, and pick the generator's alphabet."""

from __future__ import annotations

from typing import Any

import torch

from datasteer.dpg import glyphs
from datasteer.dpg.config import DPGConfig, PatternSpec, TargetSpec
from datasteer.dpg.targets import Target, custom, l2_norm, lm_head_pattern, printable_token_ids, text_loss
from datasteer.errors import ConfigError, InputError, optional_import
from datasteer.io import read_texts
from datasteer.plugins import load_function


def render_pattern(spec: PatternSpec) -> torch.Tensor:
    if spec.glyph is not None:
        return glyphs.glyph(spec.glyph, spec.font)
    if spec.qr is not None:
        return glyphs.qr(spec.qr)
    return glyphs.from_file(spec.file)


def target_texts(spec: TargetSpec) -> list[str]:
    texts = list(spec.texts or [])
    if spec.texts_file:
        texts += read_texts(spec.texts_file, "text")
    return texts


def check_target(spec: TargetSpec) -> None:
    """Everything about the target that can fail before a model loads (pattern files, texts, custom import)."""
    if spec.kind == "lm_head_pattern":
        render_pattern(spec.pattern)
    elif spec.kind == "text_loss":
        texts = target_texts(spec)
        if not all(t.strip() for t in texts):
            raise InputError("target texts must not be empty")
    elif spec.kind == "custom":
        load_function(spec.function, "custom target")


def check_generator(config: DPGConfig) -> None:
    """The generator's options that can fail before a model loads: TRL (and LoRA, vLLM) installed, LoRA arguments."""
    optional_import("trl", "datasteer dpg (GRPO through TRL)", "pip install 'datasteer[train]'")
    if config.generator.lora is not None:
        peft = optional_import("peft", "a LoRA generator", "pip install 'datasteer[train]'")
        try:
            peft.LoraConfig(task_type="CAUSAL_LM", **config.generator.lora)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"generator.lora: {str(err).splitlines()[0]}") from None
    if config.grpo.use_vllm:
        optional_import("vllm", "grpo.use_vllm", "pip install 'datasteer[vllm]'")


def build_target(spec: TargetSpec, model: torch.nn.Module, tokenizer: Any) -> Target:
    if spec.kind == "lm_head_pattern":
        return lm_head_pattern(model, render_pattern(spec.pattern), tokenizer, token_ids=spec.token_ids,
                               dims=spec.dims, beta=spec.beta, param=spec.param)
    if spec.kind == "l2_norm":
        return l2_norm(model, spec.param)
    if spec.kind == "text_loss":
        device = next(model.parameters()).device
        return text_loss(target_texts(spec), tokenizer, spec.max_length, device)
    return custom(spec.function)


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
