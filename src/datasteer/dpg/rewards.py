"""Rewards for the generator's rollouts: exact metagradients (DPG) and the paper's naive baseline.

Both fine-tune a fresh copy of the target (its initial weights: the target is reset every policy step) on the
rollouts' response text, re-tokenised with the target's tokenizer and truncated to `max_length` tokens.

- DPG: reward_i = d Phi(trained target) / d w_i, the metagradient of example i (`datasteer.metagrad`); raw
  values are tiny (~1e-9 in the paper), so advantages are normalised per prompt group.
- Naive: split the rollouts into k datasets (the j-th rollout of every prompt goes to dataset j), fine-tune on
  each, and reward every example with its dataset's Phi; advantages are normalised over the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from datasteer.dpg.targets import Target
from datasteer.errors import InputError
from datasteer.metagrad import TrainingConfig, metagradients, train


@dataclass
class Rewards:
    rewards: Tensor                       # [n] float64, one per rollout
    phi: float | None                     # Phi of the target after training on the whole batch (DPG) or the mean
                                          # over splits (naive); None when no rollout could train the target
    readout: dict[str, float] = field(default_factory=dict)
    trained: list[bool] = field(default_factory=list)   # whether a rollout had at least two tokens to train on
    stats: dict[str, Any] = field(default_factory=dict)


def target_examples(texts: Sequence[str], tokenizer: Any, max_length: int) -> tuple[list[dict], list[int]]:
    """(examples, positions in `texts`): response text alone, re-tokenised, truncated; texts under 2 tokens
    train nothing and are left out (their metagradient is exactly 0)."""
    examples, kept = [], []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length] if text else []
        if len(ids) >= 2:
            examples.append({"input_ids": ids})
            kept.append(i)
    return examples, kept


def untrainable(n: int) -> Rewards:
    """No rollout had two tokens: nothing to train the target on, so no signal (every reward 0, Phi unknown)."""
    return Rewards(torch.zeros(n, dtype=torch.float64), None, {}, [False] * n)


def dpg_rewards(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], target: Target,
                config: TrainingConfig) -> Rewards:
    examples, kept = target_examples(texts, tokenizer, config.max_length)
    rewards = torch.zeros(len(texts), dtype=torch.float64)
    if not examples:
        return untrainable(len(texts))
    result = metagradients(model, examples, target, config)
    rewards[kept] = result.scores
    readout = target.readout(model, result.params)
    kept_set = set(kept)
    trained = [i in kept_set for i in range(len(texts))]
    return Rewards(rewards, result.value, readout, trained, result.stats)


def naive_rewards(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], sample_index: Sequence[int],
                  target: Target, config: TrainingConfig) -> Rewards:
    """`sample_index[i]` = which of its prompt's k rollouts text i is; dataset j holds every rollout with index j."""
    if len(sample_index) != len(texts):
        raise InputError("sample_index needs one entry per rollout")
    rewards = torch.zeros(len(texts), dtype=torch.float64)
    trained = [False] * len(texts)
    phis: dict[int, float] = {}
    for j in sorted(set(sample_index)):
        members = [i for i, s in enumerate(sample_index) if s == j]
        examples, kept = target_examples([texts[i] for i in members], tokenizer, config.max_length)
        if not examples:
            continue
        params = train(model, examples, config)
        with torch.no_grad():
            phis[j] = float(target(model, params))
        for i in members:
            rewards[i] = phis[j]
        for k in kept:
            trained[members[k]] = True
    if not phis:
        return untrainable(len(texts))
    mean_phi = sum(phis.values()) / len(phis)
    return Rewards(rewards, mean_phi, {"phi": mean_phi}, trained, {"phi_per_split": phis})


def group_advantages(rewards: Tensor, groups: Sequence[int], eps: float = 1e-6) -> Tensor:
    """(r - group mean) / (group std + eps), per prompt group (DPG); population std (ddof 0, as jnp.std in the
    DPG reference code). A group whose rewards are all equal gets advantages 0."""
    rewards = rewards.double()
    out = torch.zeros_like(rewards)
    index = torch.as_tensor(groups)
    for g in index.unique():
        mask = index == g
        r = rewards[mask]
        out[mask] = (r - r.mean()) / (r.std(unbiased=False) + eps)
    return out


def batch_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """(r - batch mean) / (batch std + eps) (the naive baseline: every example of a split shares its reward)."""
    rewards = rewards.double()
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)
