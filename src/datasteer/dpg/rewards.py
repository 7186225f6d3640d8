"""Rewards for the generator's rollouts: exact metagradients (DPG) and the paper's naive baseline.

Both fine-tune a fresh copy of the target (its initial weights: the target is reset every policy step) on the
rollouts' response text, re-tokenised with the target's tokenizer and truncated to `max_length` tokens.

- DPG: reward_i = d Phi(trained target) / d w_i, the metagradient of example i (`datasteer.metagrad`); raw
  values are tiny (~1e-9 in the paper), so advantages are normalised per prompt group.
- Naive: split the rollouts into k datasets (the j-th rollout of every prompt goes to dataset j), fine-tune on
  each, and reward every example with its dataset's Phi; advantages are normalised over the whole batch.

Normalisation: (r - mean) / (std + eps), the std the population's (default) or the unbiased one (`advantages.std`,
the DPG authors' choice through verl), eps `advantages.eps` (1e-6 for both).

`RewardFunction` is the callable TRL's GRPOTrainer calls with a generation batch: rollouts -> target rewards ->
normalised advantages; it appends the record of each batch to the arm's `StepRecords`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from datasteer import distributed
from datasteer.dpg.config import AdvantageSpec
from datasteer.dpg.records import PhaseClock, StepRecords
from datasteer.errors import InputError
from datasteer.metagrad import Target, TrainingConfig, metagradients, train
from datasteer.training import TrainingDivergedError


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
        params = train(model, examples, config)  # a diverged inner run stops here (TrainingDivergedError)
        with torch.no_grad():
            phis[j] = float(target(model, params))
        if not math.isfinite(phis[j]):
            raise TrainingDivergedError(f"Phi of the target trained on split {j} is {phis[j]}; lower "
                                        "training.learning_rate, or check the target")
        for i in members:
            rewards[i] = phis[j]
        for k in kept:
            trained[members[k]] = True
    if not phis:
        return untrainable(len(texts))
    mean_phi = sum(phis.values()) / len(phis)
    return Rewards(rewards, mean_phi, {"phi": mean_phi}, trained, {"phi_per_split": phis})


def group_advantages(rewards: Tensor, groups: Sequence[int], eps: float = 1e-6, unbiased: bool = False) -> Tensor:
    """(r - group mean) / (group std + eps), per prompt group (DPG); the population std (ddof 0) unless `unbiased`
    (ddof 1: torch.std's default, which verl's GRPO advantage and so the DPG authors use). A group whose rewards
    are all equal gets advantages 0."""
    rewards = rewards.double()
    out = torch.zeros_like(rewards)
    index = torch.as_tensor(groups)
    for g in index.unique():
        mask = index == g
        r = rewards[mask]
        out[mask] = (r - r.mean()) / (r.std(unbiased=unbiased) + eps)
    return out


def batch_advantages(rewards: Tensor, eps: float = 1e-6, unbiased: bool = False) -> Tensor:
    """(r - batch mean) / (batch std + eps) (the naive baseline: every example of a split shares its reward)."""
    rewards = rewards.double()
    return (rewards - rewards.mean()) / (rewards.std(unbiased=unbiased) + eps)


# ---------------------------------------------------------------- the reward function TRL calls

@dataclass
class InnerLoop:
    """The target side of every reward: the target model (each fine-tuning starts from its initial weights), its
    tokenizer (re-tokenises rollouts), Phi, and how the target is fine-tuned."""

    model: torch.nn.Module
    tokenizer: Any
    target: Target
    training: TrainingConfig


class RewardFunction:
    """Called by GRPOTrainer with the whole generation batch; returns normalised advantages as rewards and
    appends the batch's record (reward statistics, Phi, readout, a sample) to `records`."""

    def __init__(self, arm: str, num_generations: int, inner: InnerLoop, tokenizer: Any, records: StepRecords,
                 advantages: AdvantageSpec | None = None, clock: PhaseClock | None = None):
        self.arm = arm
        self.clock = clock
        self.advantages = advantages or AdvantageSpec()
        self.__name__ = f"{arm}_reward"
        self.k = num_generations
        self.inner = inner
        self.tokenizer = tokenizer                  # the generator's: decodes rollouts
        self.records = records

    def texts(self, completion_ids: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids]

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                 **kwargs: Any) -> list[float]:
        """On several processes TRL hands each its own slice of the step's rollouts; a reward depends on the whole
        batch the target trains on, so every process gathers the global batch (in process order, which is TRL's
        order of the gathered rewards), computes its rewards (the metagradients data parallel) and returns its
        own slice."""
        parts = distributed.all_gather_objects([list(ids) for ids in completion_ids])
        start = sum(len(part) for part in parts[:distributed.rank()]) if len(parts) > 1 else 0
        everyone = [ids for part in parts for ids in part]
        try:
            advantages = self._rewards(everyone)
        except TrainingDivergedError as err:  # say which arm's rewards it was
            raise TrainingDivergedError(f"{self.arm} arm, rewards: {err}") from None
        return advantages[start:start + len(completion_ids)]

    def _rewards(self, completion_ids: list[list[int]]) -> list[float]:
        start = time.perf_counter()
        texts = self.texts(completion_ids)
        inner = self.inner
        if self.arm == "dpg":
            groups = [i // self.k for i in range(len(texts))]  # TRL's sampler repeats each prompt k times in a row
            result = dpg_rewards(inner.model, inner.tokenizer, texts, inner.target, inner.training)
            advantages = group_advantages(result.rewards, groups, **self._normalisation())
        else:
            splits = [i % self.k for i in range(len(texts))]
            result = naive_rewards(inner.model, inner.tokenizer, texts, splits, inner.target, inner.training)
            advantages = batch_advantages(result.rewards, **self._normalisation())
        self.records.append(step_record(result, texts, completion_ids))
        if self.clock is not None:
            self.clock.add("reward", time.perf_counter() - start)
        return advantages.tolist()

    def _normalisation(self) -> dict[str, Any]:
        return {"eps": self.advantages.eps, "unbiased": self.advantages.std == "unbiased"}


def step_record(result: Rewards, texts: list[str], completion_ids: list[list[int]]) -> dict:
    r = result.rewards
    lengths = [len(ids) for ids in completion_ids]
    return {
        "rollouts": len(texts),
        "reward": {"mean": float(r.mean()), "std": float(r.std(unbiased=False)), "min": float(r.min()),
                   "max": float(r.max())},
        "untrainable": sum(not t for t in result.trained),
        "completion_tokens_mean": sum(lengths) / max(len(lengths), 1),
        "phi": result.phi,
        "readout": result.readout,
        "sample": texts[0][:200],
    }
