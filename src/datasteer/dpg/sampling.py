"""Rollouts that do not depend on how the batch is split: every row is sampled from its own random stream.

transformers' sampling draws every row of a batch from one generator, so a row's tokens depend on which rows
share its batch: a run on N processes (each generating 1/N of the rollouts) would sample other texts than one
process, and so train on other data. `KeyedSampler` instead draws row r's noise from a generator seeded by
(run seed, step, r), r the row's position in the step's global batch of rollouts, one draw of the vocabulary per
position: the rollouts of a step are then the same on 1, 2 or 8 processes, and after a resume.

The draw is Gumbel-max, exact sampling: argmax(scores + G), G_v = -log(-log U_v), picks token v with probability
softmax(scores)_v. The scores are first warped as transformers would (temperature, top-k, top-p, min-p, ... with
its own classes, in its order), since transformers applies a custom logits processor *before* its warpers; the
processor then returns 0 at the chosen token and -inf elsewhere, which transformers' warpers leave as they are and
its multinomial draw picks with probability 1.

`key_rollouts` hooks it into TRL's generation: the generator's `generate` (what TRL calls on the unwrapped model,
with or without LoRA) gets the processor when it is called with the trainer's own generation config. Validation
samples with its own settings and RNG and is left alone. vLLM generation does not go through it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from datasteer.runs import derive_seed


def warpers(config: Any) -> list[Any]:
    """transformers' sampling warpers for `config` (a GenerationConfig), in the order `generate` applies them."""
    from transformers.generation import logits_process as lp

    out: list[Any] = []
    if config.temperature is not None and config.temperature != 1.0:
        out.append(lp.TemperatureLogitsWarper(config.temperature))
    if getattr(config, "top_h", None) is not None:
        out.append(lp.TopHLogitsWarper(top_h=config.top_h))
    if config.top_k is not None and config.top_k != 0:
        out.append(lp.TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        out.append(lp.TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    if config.min_p is not None:
        out.append(lp.MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    if config.typical_p is not None and config.typical_p < 1.0:
        out.append(lp.TypicalLogitsWarper(mass=config.typical_p, min_tokens_to_keep=1))
    if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
        out.append(lp.EpsilonLogitsWarper(epsilon=config.epsilon_cutoff, min_tokens_to_keep=1))
    if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
        raise NotImplementedError("eta_cutoff sampling is not supported with per-row sampling streams")
    return out


class KeyedSampler:
    """A transformers logits processor: row i of the batch samples from the stream of global row `first + i`."""

    def __init__(self, seed: int, step: int, first: int, config: Any):
        self.seed, self.step, self.first = seed, step, first
        self.warpers = warpers(config)
        self.streams: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        rows, vocabulary = scores.shape
        if self.streams is None:
            self.streams = [torch.Generator().manual_seed(derive_seed(self.seed, "rollout", self.step, self.first + i))
                            for i in range(rows)]
        uniform = torch.stack([torch.rand(vocabulary, generator=g, dtype=torch.float64) for g in self.streams])
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300)))
        choice = (scores.double() + gumbel.to(scores.device)).argmax(dim=-1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, choice.unsqueeze(1), 0.0)


def key_rollouts(model: torch.nn.Module, seed: int, where: Callable[[], tuple[Any, int, int]]) -> None:
    """Make `model.generate` sample TRL's rollouts with `KeyedSampler`. `where()` returns (the trainer's generation
    config, the step, this process's index): a call with that generation config samples rows rank x rows ..."""
    from transformers import LogitsProcessorList

    original = model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        config, step, rank = where()
        given = kwargs.get("generation_config")
        if given is not None and given is config and given.do_sample and kwargs.get("logits_processor") is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            rows = ids.shape[0] * (given.num_return_sequences or 1)
            kwargs["logits_processor"] = LogitsProcessorList([KeyedSampler(seed, step, rank * rows, given)])
        return original(*args, **kwargs)

    model.generate = generate  # type: ignore[method-assign]
