"""`text_loss`: teach the target texts (a new language, a UUID, ...). Phi = -mean next-token loss of the target on
them, or (score last_word) minus the loss of each text's last word given the rest; readout = the loss. The Target
itself is metagrad's `TextLoss`, the default metric of `datasteer attribute`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from datasteer.dpg.targets.base import Readout, TargetSpecBase
from datasteer.errors import InputError
from datasteer.io import read_texts
from datasteer.metagrad.metrics import TextLoss, text_loss


class TextLossSpec(TargetSpecBase):
    kind: Literal["text_loss"] = "text_loss"
    texts: list[str] | None = None
    texts_file: str | None = Field(None, description="one text per line, or a JSONL/CSV file with a 'text' column")
    max_length: int = Field(128, ge=2, description="tokens per text")
    score: Literal["all", "last_word"] = Field(
        "all", description="all: the mean next-token loss over each whole text; last_word: the summed loss of each "
        "text's last word given the words before it (lm-eval's LAMBADA split, the DPG authors' new-language metric)")
    length: int | None = Field(None, ge=1, description="divide each text's summed loss by this many tokens instead "
                               "(the DPG authors divide by their padded length, 128); default: the mean over the "
                               "text's tokens (all) or the word's summed loss (last_word)")

    readout = Readout("loss", higher_is_better=False)

    @model_validator(mode="after")
    def _some_texts(self) -> TextLossSpec:
        if not (self.texts or self.texts_file):
            raise ValueError("target kind text_loss needs 'texts' or 'texts_file'")
        return self

    def all_texts(self) -> list[str]:
        texts = list(self.texts or [])
        if self.texts_file:
            texts += read_texts(self.texts_file, "text")
        return texts

    def check(self) -> None:
        if not all(t.strip() for t in self.all_texts()):
            raise InputError("target texts must not be empty")
        if self.score == "last_word":
            alone = [t for t in self.all_texts() if " " not in t.strip()]
            if alone:
                raise InputError(f"target.score last_word needs texts of several words; {alone[0][:60]!r} has one")

    def build(self, model: torch.nn.Module, tokenizer: Any) -> TextLoss:
        device = next(model.parameters()).device
        return text_loss(self.all_texts(), tokenizer, self.max_length, device, self.score, self.length)
