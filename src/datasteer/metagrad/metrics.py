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
    """Minus the mean over examples of each example's next-token loss on its trained tokens (labels not -100):
    their mean (`length` None), or their sum divided by `length` (1: the loss of a word as lm-eval's
    loglikelihood counts it; 128: the DPG authors' loss over their padded length)."""

    examples: list[dict[str, list[int]]]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    name: str = "text_loss"
    length: int | None = None
    _batch: Any = None

    def batch(self) -> Any:
        if self._batch is None:
            prepared = prepare_examples(self.examples, max(len(e["input_ids"]) for e in self.examples))
            self._batch = collate(prepared, list(range(len(prepared))), 0, self.device)
        return self._batch

    def phi(self, model, params):
        return -example_losses(model, params, self.batch(), length=self.length).mean()

    def readout(self, model, params):
        with torch.no_grad():
            loss = -float(self.phi(model, params))
        return {"phi": -loss, "loss": loss}


SCORES = ("all", "last_word")


def text_loss(texts: Sequence[str], tokenizer: Any, max_length: int = 128,
              device: str | torch.device = "cpu", score: str = "all", length: int | None = None) -> TextLoss:
    """Minus the target's loss on `texts`.

    score "all": the mean next-token loss over each whole text (BOS if the tokenizer has one, then its tokens, cut
    at `max_length`). score "last_word": the summed loss of each text's last word given the rest, as lm-eval's
    LAMBADA task splits it (context = the words before the last space, continuation = " " + the last word, each
    tokenized on its own, as the DPG authors' target does); a context too long loses its start, so the word is
    always scored. `length`: divide each text's summed loss by this instead (default: the mean over its tokens
    for "all", the sum for "last_word").
    """
    if score not in SCORES:
        raise InputError(f"text_loss score {score!r} is not one of {', '.join(SCORES)}")
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise InputError("text_loss needs at least one non-empty text")
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    examples = []
    for text in texts:
        if score == "all":
            ids = (bos + tokenizer(text, add_special_tokens=False)["input_ids"])[:max_length]
            if len(ids) < 2:
                raise InputError(f"text {text!r} is a single token; a loss needs at least two")
            examples.append({"input_ids": ids})
            continue
        words = text.split(" ")
        context, word = " ".join(words[:-1]), " " + words[-1]
        if not context.strip() or not words[-1].strip():
            raise InputError(f"text {text[:60]!r} needs words before its last one and a last word (score "
                             "last_word splits at the last space)")
        word_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        context_ids = bos + tokenizer(context, add_special_tokens=False)["input_ids"]
        room = max_length - len(word_ids)
        if room < 1:
            raise InputError(f"the last word of {text[:60]!r} is {len(word_ids)} tokens; raise max_length above it")
        context_ids = context_ids[-room:]
        examples.append({"input_ids": context_ids + word_ids, "labels": [-100] * len(context_ids) + word_ids})
    return TextLoss(examples, torch.device(device), length=length if length is not None or score == "all" else 1)
