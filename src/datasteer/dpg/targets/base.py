"""What every DPG target shares: the recipe section's base model and the declaration of what a target's readout
reports, and the lookups of the LM head and of the tokens a generator can write."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field

from datasteer.config import StrictModel
from datasteer.errors import ConfigError
from datasteer.metagrad.metrics import Target


@dataclass(frozen=True)
class Readout:
    """The number a target's `readout` reports besides phi, as reports show it.

    key: its name in the readout (None: phi only); higher_is_better: which way the target pushes it (Phi itself
    is always higher-is-better); thresholds: levels whose first crossing the report counts examples to;
    untrained: whether its value at the target's initial weights means anything (a pattern slice that has not
    moved has no sign).
    """

    key: str | None
    higher_is_better: bool = True
    thresholds: tuple[float, ...] = ()
    untrained: bool = True


class TargetSpecBase(StrictModel):
    """A recipe's `target` section: the target model, and (in each kind's subclass) how Phi is made on it.

    A kind is one module of `datasteer.dpg.targets` with its subclass (a `kind` literal, its fields, `readout`,
    `check` and `build`) and one line in `TARGETS`.
    """

    model: str = Field(..., min_length=1, description="model spec of the target (loaded with eager attention)")
    untie: bool = Field(False, description="give the target an LM head of its own, a copy of its input embedding "
                        "(as the DPG authors' GPT-2, whose head is untied): the head and the embedding then train "
                        "apart, and a pattern is written into the head alone")
    readout: ClassVar[Readout] = Readout(None)

    def check(self) -> None:
        """Everything about this target that can fail before a model loads (files, texts, imports)."""

    def build(self, model: torch.nn.Module, tokenizer: Any) -> Target:
        """The target on the loaded target model (its initial weights are Phi's reference)."""
        raise NotImplementedError


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


def untie_lm_head(model: torch.nn.Module) -> str:
    """Make the LM head a parameter of its own, initialised to a copy of the input embedding it was tied to, and
    keep it apart (the config no longer ties them, so a later `tie_weights` leaves them separate). Returns the
    head's parameter name. A head that is not tied is refused: untying it would do nothing."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or embedding is None:
        raise ConfigError("target.untie: the target has no LM head and input embedding to untie")
    if head.weight is not embedding.weight:
        raise ConfigError("target.untie: the target's LM head is already separate from its input embedding; remove "
                          "untie")
    head.weight = torch.nn.Parameter(embedding.weight.detach().clone(), requires_grad=embedding.weight.requires_grad)
    config = getattr(model, "config", None)
    if config is not None:
        for part in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
            part.tie_word_embeddings = False
    return parameter_name(model)


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
