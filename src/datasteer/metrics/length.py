"""Length: characters, words (whitespace-separated), tokens of a given tokenizer, sentences."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datasteer.metrics.base import BaseScorer, register, register_group
from datasteer.metrics.readability import sentence_count

DEFAULT_TOKENIZER = "embedded:smollm2"


class _Simple(BaseScorer):
    def __init__(self, name: str, fn: Any, description: str):
        super().__init__(name=name, higher_is_better=True, batched=False, batch_size=4096, description=description)
        self._fn = fn

    def score(self, texts: Sequence[str], prompts: Sequence[str] | None = None) -> list[float]:
        return [float(self._fn(t)) for t in texts]


class TokenLengthScorer(BaseScorer):
    """Tokens of `tokenizer` (a model spec), special tokens excluded; no length limit (nothing is truncated)."""

    def __init__(self, tokenizer: str = DEFAULT_TOKENIZER):
        super().__init__(name="length_tokens", higher_is_better=True, batched=True, batch_size=512,
                         description=f"tokens of the {tokenizer} tokenizer")
        from datasteer.models import load_tokenizer

        self.tokenizer_spec = tokenizer
        self._tokenizer = load_tokenizer(tokenizer)

    def score(self, texts: Sequence[str], prompts: Sequence[str] | None = None) -> list[float]:
        if not texts:
            return []
        encoded = self._tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        return [float(len(ids)) for ids in encoded]


register("length_chars", "characters (Unicode code points)")(
    lambda: _Simple("length_chars", len, "characters"))
register("length_words", "whitespace-separated words")(
    lambda: _Simple("length_words", lambda t: len(t.split()), "whitespace-separated words"))
register("length_sentences", "sentences (readability's sentence rules)")(
    lambda: _Simple("length_sentences", sentence_count, "sentences"))
register("length_tokens", "tokens of a tokenizer (default embedded:smollm2)", params=("tokenizer",))(TokenLengthScorer)
register_group("length", ("length_chars", "length_words", "length_tokens", "length_sentences"))
