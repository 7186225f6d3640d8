"""DPG targets: a differentiable metric Phi(model, params) of the target model after fine-tuning, and a readout.

`params` is a name -> tensor mapping like `named_parameters()` (what `datasteer.metagrad.train` returns), so
every target is also a metric for `metagradients`. Higher Phi is better.

Each kind is one module here holding its recipe section (a `TargetSpecBase` subclass: fields, the `Readout` it
declares, `check` before a model loads, `build` on the loaded target) beside its Target code:

- `lm_head_pattern`: a +-1 pattern (glyph, QR code, file) in a slice of the LM head; readout pixel accuracy.
- `l2_norm`: -||W||_F of the LM head or any named parameter; readout l2 (lower is better).
- `text_loss`: minus the target's loss on given texts; readout loss (lower is better).
- `custom`: `package.module:function(model, params) -> 0-d tensor`; readout phi alone.

`TARGETS` is the registry: adding a kind is one module and one line there. `TargetSpec` is the recipe's
`target:` section, a pydantic union discriminated by `kind`.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag

from datasteer.dpg.targets.base import Readout, TargetSpecBase, parameter_name, printable_token_ids, untie_lm_head
from datasteer.dpg.targets.custom import CustomTarget, CustomTargetSpec, custom
from datasteer.dpg.targets.l2_norm import L2Norm, L2NormSpec, l2_norm
from datasteer.dpg.targets.lm_head_pattern import (
    LMHeadPattern,
    LMHeadPatternSpec,
    PatternSpec,
    lm_head_pattern,
    writable_token_ids,
)
from datasteer.dpg.targets.text_loss import TextLossSpec
from datasteer.metagrad.metrics import Target, TextLoss, text_loss

TARGETS: dict[str, type[TargetSpecBase]] = {
    "lm_head_pattern": LMHeadPatternSpec,
    "l2_norm": L2NormSpec,
    "text_loss": TextLossSpec,
    "custom": CustomTargetSpec,
}


def _kind(value: Any) -> str | None:
    return value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)


TargetSpec = Annotated[
    Union[tuple(Annotated[cls, Tag(kind)] for kind, cls in TARGETS.items())],  # type: ignore[misc]
    Discriminator(_kind, custom_error_type="unknown_target_kind",
                  custom_error_message=f"kind must be one of {', '.join(TARGETS)}"),
]

__all__ = ["TARGETS", "CustomTarget", "CustomTargetSpec", "L2Norm", "L2NormSpec", "LMHeadPattern",
           "LMHeadPatternSpec", "PatternSpec", "Readout", "Target", "TargetSpec", "TargetSpecBase", "TextLoss",
           "TextLossSpec", "custom", "l2_norm", "lm_head_pattern", "parameter_name", "printable_token_ids",
           "text_loss", "untie_lm_head", "writable_token_ids"]
