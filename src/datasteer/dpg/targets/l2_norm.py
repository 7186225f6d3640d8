"""`l2_norm`: shrink a parameter of the target (default: its LM head). Phi = -||W||_F; readout = ||W||_F."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from datasteer.dpg.targets.base import Readout, TargetSpecBase, parameter_name
from datasteer.metagrad.metrics import Target


class L2NormSpec(TargetSpecBase):
    kind: Literal["l2_norm"] = "l2_norm"
    param: str | None = Field(None, description="parameter name; default: the LM head")

    readout = Readout("l2", higher_is_better=False)

    def build(self, model: torch.nn.Module, tokenizer: Any) -> L2Norm:
        return l2_norm(model, self.param)


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
