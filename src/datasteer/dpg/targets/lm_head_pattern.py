"""`lm_head_pattern`: write a +-1 pattern into a slice of the target's LM head.

Phi = -mean softplus(-beta * S * (P - P0)) on a slice P of the LM head (rows = token ids, columns = hidden
dimensions), S in {-1, +1}; readout = pixel accuracy of sign(P - P0) against S. S is the pattern's image (+1 = ink),
transposed with `transpose` (the image's rows are then hidden dims, as in the DPG authors' [hidden, vocabulary]
kernel) and negated with `ink: -1` (ink is where the weights fall, the authors' sign for their "67" strokes and
dark QR modules); `image` maps a slice back to the image's layout and sign, so that ink is +1 there again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from datasteer.config import StrictModel
from datasteer.dpg import glyphs
from datasteer.dpg.targets.base import Readout, TargetSpecBase, parameter_name, printable_token_ids
from datasteer.errors import ConfigError, InputError
from datasteer.metagrad.metrics import Target


class PatternSpec(StrictModel):
    """Where the +-1 pattern comes from: exactly one of glyph, qr, file, bitmap."""

    glyph: str | None = Field(None, description="text rendered with a built-in bitmap font ('67' is 7 x 6)")
    font: Literal["auto", "3x7", "5x7"] = "auto"
    qr: str | None = Field(None, description="payload of a QR code (version 1 is 21 x 21: up to 17 bytes at error "
                           "level L, 14 at M)")
    qr_error: Literal["L", "M", "Q", "H"] = Field("L", description="the QR code's error-correction level")
    qr_mask: int | None = Field(None, ge=0, le=7, description="the QR code's mask pattern; default: segno's choice")
    file: str | None = Field(None, description="text file of '#' (+1) and '.' (-1) rows")
    bitmap: list[str] | None = Field(None, description="the pattern written out: rows of '#' (+1) and '.' (-1)")

    @model_validator(mode="after")
    def _one_source(self) -> PatternSpec:
        given = [k for k in ("glyph", "qr", "file", "bitmap") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a pattern needs exactly one of glyph, qr, file, bitmap (got "
                             f"{', '.join(given) or 'none'})")
        return self

    def render(self) -> Tensor:
        """The pattern's image, {-1, +1} (+1 = ink), [rows, cols]."""
        if self.glyph is not None:
            return glyphs.glyph(self.glyph, self.font)
        if self.qr is not None:
            return glyphs.qr(self.qr, self.qr_error, mask=self.qr_mask)
        if self.bitmap is not None:
            return glyphs.from_rows(self.bitmap, "pattern.bitmap")
        return glyphs.from_file(self.file)


class LMHeadPatternSpec(TargetSpecBase):
    kind: Literal["lm_head_pattern"] = "lm_head_pattern"
    pattern: PatternSpec = Field(..., description="glyph, qr or file")
    beta: float = Field(20.0, gt=0)
    token_ids: list[int] | None = Field(None, description="rows of the LM head; default: writable characters")
    dims: list[int] | None = Field(None, description="columns (hidden dims); default: 0..cols-1")
    param: str | None = Field(None, description="parameter name; default: the LM head")
    transpose: bool = Field(False, description="the image's rows are hidden dims and its columns token ids (the "
                            "DPG authors' layout, whose LM-head kernel is hidden x vocabulary); default: rows are "
                            "token ids")
    ink: Literal[1, -1] = Field(1, description="the sign of S on ink (glyph strokes, dark QR modules, '#'): +1, the "
                                "weights rise there; -1, they fall (the DPG authors' sign)")

    readout = Readout("pixel_accuracy", thresholds=(0.90, 0.95), untrained=False)

    def check(self) -> None:
        self.pattern.render()

    def signs(self) -> Tensor:
        """S in the slice's layout ([token ids, hidden dims]): the image, transposed and signed as configured."""
        image = self.pattern.render()
        return self.ink * (image.T.contiguous() if self.transpose else image)

    def image(self, values: Any) -> Any:
        """A slice's values ([token ids, hidden dims], a tensor or an array) in the image's layout and sign: ink
        is +1 again, so that sign(image(P - P0)) reads as the pattern."""
        values = values.T if self.transpose else values
        return values * self.ink

    def build(self, model: torch.nn.Module, tokenizer: Any) -> LMHeadPattern:
        return lm_head_pattern(model, self.signs(), tokenizer, token_ids=self.token_ids, dims=self.dims,
                               beta=self.beta, param=self.param)


@dataclass
class LMHeadPattern(Target):
    pattern: Tensor                 # S, {-1, +1}, [rows, cols]
    token_ids: list[int]
    dims: list[int]
    initial: Tensor                 # P0, the slice before any training
    param: str                      # name of the LM head in params
    beta: float = 20.0
    name: str = "lm_head_pattern"

    def slice(self, params: dict[str, Tensor]) -> Tensor:
        weight = params[self.param]
        rows = torch.as_tensor(self.token_ids, device=weight.device)
        cols = torch.as_tensor(self.dims, device=weight.device)
        return weight.index_select(0, rows).index_select(1, cols)

    def delta(self, params: dict[str, Tensor]) -> Tensor:
        """P - P0: the slice's change since the target's initial weights."""
        return self.slice(params) - self.initial.to(params[self.param])

    def phi(self, model, params):
        delta = self.delta(params)
        signs = self.pattern.to(delta)
        return -F.softplus(-self.beta * signs * delta).mean()

    def readout(self, model, params):
        with torch.no_grad():
            delta = self.delta(params)
            accuracy = (torch.sign(delta) == self.pattern.to(delta)).double().mean()
            return {"phi": float(self.phi(model, params)), "pixel_accuracy": float(accuracy)}

    def check_writable(self, tokenizer: Any, writable: set[str]) -> None:
        """Every row of the pattern must be a token the generator can write (`writable`: decoded pieces)."""
        missing = [t for t in (tokenizer.decode([i]) for i in self.token_ids) if t not in writable]
        if missing:
            raise ConfigError(f"the pattern's token rows {missing} are not among the generator's allowed tokens")


def writable_token_ids(tokenizer: Any, count: int) -> list[int]:
    """`count` token ids a generator can actually write (single printable characters, by id), so that the
    pattern sits on rows that rollouts can reach."""
    chosen = printable_token_ids(tokenizer, count)
    if len(chosen) < count:
        raise InputError(f"the tokenizer has only {len(chosen)} single-character printable tokens, the pattern "
                         f"needs {count} rows; pass token_ids explicitly")
    return chosen


def lm_head_pattern(model: torch.nn.Module, pattern: Tensor, tokenizer: Any = None,
                    token_ids: Sequence[int] | None = None, dims: Sequence[int] | None = None, beta: float = 20.0,
                    param: str | None = None) -> LMHeadPattern:
    """Build the pattern target on `model`'s LM head: rows default to writable tokens, columns to dims 0..cols-1."""
    name = parameter_name(model, param)
    weight = dict(model.named_parameters())[name]
    rows, cols = pattern.shape
    if token_ids is None:
        if tokenizer is None:
            raise ConfigError("give token_ids or a tokenizer to choose writable tokens from")
        token_ids = writable_token_ids(tokenizer, rows)
    dims = list(range(cols)) if dims is None else list(dims)
    token_ids = list(token_ids)
    if len(token_ids) != rows or len(dims) != cols:
        raise ConfigError(f"the pattern is {rows} x {cols} but {len(token_ids)} token ids and {len(dims)} dims were "
                          f"given")
    if max(token_ids) >= weight.shape[0] or max(dims) >= weight.shape[1] or min(token_ids + dims) < 0:
        raise ConfigError(f"token ids or dims fall outside the LM head ({weight.shape[0]} x {weight.shape[1]})")
    target = LMHeadPattern(pattern.float(), token_ids, dims, torch.zeros(rows, cols), name, beta)
    target.initial = target.slice({name: weight.detach()}).clone()
    return target
