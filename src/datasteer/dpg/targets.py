"""Targets: a differentiable metric Phi(model, params) of the target model after fine-tuning, and a readout.

`params` is a name -> tensor mapping like `named_parameters()` (what `datasteer.metagrad.train` returns), so
every target is also a metric for `metagradients`. Higher Phi is better.

- `LMHeadPattern`: Phi = -mean softplus(-beta * S * (P - P0)) on a slice P of the LM head (rows = token ids,
  columns = hidden dimensions), S in {-1, +1}; readout = pixel accuracy of sign(P - P0) against S.
- `L2Norm`: Phi = -||W||_F of the LM head or any named parameter.
- `TextLoss`: Phi = -mean next-token loss of the target on given texts (a new language, a UUID, ...).
- `CustomTarget`: `package.module:function(model, params) -> 0-d tensor`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from datasteer.errors import ConfigError, InputError
from datasteer.metagrad.metrics import Target, TextLoss, text_loss
from datasteer.plugins import load_function


def parameter_name(model: torch.nn.Module, param: str | None = None) -> str:
    """The name under which `named_parameters()` lists the LM head (tied heads appear as the input embedding)."""
    names = dict(model.named_parameters())
    if param is not None:
        if param not in names:
            raise ConfigError(f"model has no parameter '{param}'")
        return param
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ConfigError("model has no output embeddings; name the parameter explicitly")
    for name, p in model.named_parameters():
        if p is head.weight:
            return name
    raise ConfigError("the LM head's weight is not among the model's parameters")


def printable_token_ids(tokenizer: Any, limit: int | None = None) -> list[int]:
    """Token ids (ascending) that decode to one printable, non-space ASCII character; special tokens and
    byte-fallback pieces are skipped. Stops after `limit` ids when given."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    chosen = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        if len(text) == 1 and text.isprintable() and not text.isspace() and text.isascii():
            chosen.append(token_id)
            if len(chosen) == limit:
                break
    return chosen


def writable_token_ids(tokenizer: Any, count: int) -> list[int]:
    """`count` token ids a generator can actually write (single printable characters, by id), so that the
    pattern sits on rows that rollouts can reach."""
    chosen = printable_token_ids(tokenizer, count)
    if len(chosen) < count:
        raise InputError(f"the tokenizer has only {len(chosen)} single-character printable tokens, the pattern "
                         f"needs {count} rows; pass token_ids explicitly")
    return chosen


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

    def phi(self, model, params):
        delta = self.slice(params) - self.initial.to(params[self.param])
        signs = self.pattern.to(delta)
        return -F.softplus(-self.beta * signs * delta).mean()

    def readout(self, model, params):
        with torch.no_grad():
            delta = self.slice(params) - self.initial.to(params[self.param])
            accuracy = (torch.sign(delta) == self.pattern.to(delta)).double().mean()
            return {"phi": float(self.phi(model, params)), "pixel_accuracy": float(accuracy)}


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


@dataclass
class L2Norm(Target):
    param: str
    name: str = "l2_norm"

    def phi(self, model, params):
        return -params[self.param].norm()

    def readout(self, model, params):
        with torch.no_grad():
            norm = float(params[self.param].norm())
        return {"phi": -norm, "l2": norm}


def l2_norm(model: torch.nn.Module, param: str | None = None) -> L2Norm:
    return L2Norm(parameter_name(model, param))


@dataclass
class CustomTarget(Target):
    function: Callable[..., Tensor]
    ref: str
    name: str = "custom"

    def phi(self, model, params):
        value = self.function(model, params)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise InputError(f"custom target {self.ref} must return a 0-d tensor")
        return value.reshape(())


def custom(ref: str) -> CustomTarget:
    return CustomTarget(load_function(ref, "custom target"), ref)
