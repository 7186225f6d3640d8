"""Validation of an arm: a fresh target (its initial weights) fine-tuned on the generator's rollouts for
held-out prompts, its Phi and readout; for pattern targets, the slice's change as well (`slices.jsonl`).

Rollouts are sampled under an RNG forked and seeded from the run seed and the step, so validation never
disturbs the training stream (and a resumed run validates exactly as an uninterrupted one). Prompts are encoded
by generation's `encode_prompts` (chat template, or plain text with the tokenizer's special tokens), which
renders them as TRL does for training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from datasteer.chat import encode_prompts
from datasteer.dpg.config import DPGConfig, GRPOSpec
from datasteer.dpg.records import append_jsonl
from datasteer.dpg.rewards import InnerLoop, target_examples
from datasteer.dpg.targets import LMHeadPattern
from datasteer.metagrad import train
from datasteer.runs import derive_seed


def sample_rollouts(model: torch.nn.Module, tokenizer: Any, prompts: list[str], n: int, grpo: GRPOSpec,
                    system_prompt: str | None, chat: bool, seed: int) -> list[str]:
    """n sampled completions per prompt with the generator's current weights, under a forked RNG."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts: list[str] = []
    pad_side = tokenizer.padding_side
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(prompts), 16):
                enc = encode_prompts(tokenizer, prompts[start:start + 16], system_prompt, chat).to(device)
                out = model.generate(**enc, do_sample=True, temperature=grpo.temperature, top_p=grpo.top_p,
                                     top_k=0, max_new_tokens=grpo.max_completion_length, num_return_sequences=n,
                                     pad_token_id=tokenizer.pad_token_id)
                for row in out[:, enc["input_ids"].shape[1]:]:
                    texts.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = pad_side
        model.train(was_training)
    return texts


def validate(model: torch.nn.Module, tokenizer: Any, prompts: list[str], chat: bool, config: DPGConfig,
             inner: InnerLoop, step: int) -> tuple[dict[str, Any], list | None]:
    """(record, slice change): a fresh target fine-tuned on rollouts for held-out prompts, its Phi and readout;
    the change of the LM-head slice for pattern targets (else None)."""
    n = config.validation.num_generations or config.grpo.num_generations
    texts = sample_rollouts(model, tokenizer, prompts, n, config.grpo, config.generator.system_prompt, chat,
                            derive_seed(config.seed, "validation", step))
    examples, _ = target_examples(texts, inner.tokenizer, inner.training.max_length)
    if not examples:
        return {"rollouts": len(texts), "trained": 0, "phi": None}, None
    params = train(inner.model, examples, inner.training)
    readout = inner.target.readout(inner.model, params)
    record = {"rollouts": len(texts), "trained": len(examples), **readout, "sample": texts[0][:200]}
    delta = None
    if isinstance(inner.target, LMHeadPattern):
        with torch.no_grad():
            delta = inner.target.delta(params).cpu().tolist()
    return record, delta


class Validator:
    """An arm's validation as the step logger calls it: `validator(step, model)` returns the record and appends
    the slice's change to `slices_path`; `validator.untrained()` is the readout of the target before any
    fine-tuning."""

    def __init__(self, config: DPGConfig, prompts: list[str], chat: bool, tokenizer: Any, inner: InnerLoop,
                 slices_path: Path, writes: bool = True):
        self.config, self.prompts, self.chat, self.tokenizer = config, prompts, chat, tokenizer
        self.inner, self.slices_path, self.writes = inner, slices_path, writes

    def untrained(self) -> dict[str, float]:
        model = self.inner.model
        params = {name: p.detach() for name, p in model.named_parameters()}
        return self.inner.target.readout(model, params)

    def __call__(self, step: int, model: torch.nn.Module) -> dict[str, Any]:
        record, delta = validate(model, self.tokenizer, self.prompts, self.chat, self.config, self.inner, step)
        if delta is not None and self.writes:
            append_jsonl(self.slices_path, {"step": step, "delta": delta})
        return record
