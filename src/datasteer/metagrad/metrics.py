"""Metrics of a trained model that carry their own readout: the targets of metagradients.

A `Target` is a differentiable scalar Phi(model, params) of the parameters after training (higher is better),
usable as the `metric` of `metagradients`, with a `readout` of numbers a person reads. `TextLoss` (minus the
mean loss on held-out texts) is the default metric of `datasteer attribute` and DPG's `text_loss` target; the
other DPG targets live in `datasteer.dpg.targets`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from datasteer.errors import InputError
from datasteer.metagrad.data import collate, example_losses, prepare_examples


class Target:
    """Phi of the trained target (differentiable) and numbers a person reads."""

    name: str = "target"

    def phi(self, model: torch.nn.Module, params: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def readout(self, model: torch.nn.Module, params: dict[str, Tensor]) -> dict[str, float]:
        with torch.no_grad():
            return {"phi": float(self.phi(model, params))}

    def __call__(self, model: torch.nn.Module, params: dict[str, Tensor]) -> Tensor:
        return self.phi(model, params)


@dataclass
class TextLoss(Target):
    examples: list[dict[str, list[int]]]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    name: str = "text_loss"
    _batch: Any = None

    def batch(self) -> Any:
        if self._batch is None:
            prepared = prepare_examples(self.examples, max(len(e["input_ids"]) for e in self.examples))
            self._batch = collate(prepared, list(range(len(prepared))), 0, self.device)
        return self._batch

    def phi(self, model, params):
        return -example_losses(model, params, self.batch()).mean()

    def readout(self, model, params):
        with torch.no_grad():
            loss = -float(self.phi(model, params))
        return {"phi": -loss, "loss": loss}


def text_loss(texts: Sequence[str], tokenizer: Any, max_length: int = 128,
              device: str | torch.device = "cpu") -> TextLoss:
    """Minus the target's mean loss on `texts` (each text: BOS if the tokenizer has one, then its tokens)."""
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise InputError("text_loss needs at least one non-empty text")
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    examples = []
    for text in texts:
        ids = (bos + tokenizer(text, add_special_tokens=False)["input_ids"])[:max_length]
        if len(ids) < 2:
            raise InputError(f"text {text!r} is a single token; a loss needs at least two")
        examples.append({"input_ids": ids})
    return TextLoss(examples, torch.device(device))
