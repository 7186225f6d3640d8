"""`custom`: any differentiable metric of the trained target, `package.module:function(model, params) -> 0-d
tensor`; its readout is phi alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from pydantic import Field
from torch import Tensor

from datasteer.dpg.targets.base import Readout, TargetSpecBase
from datasteer.errors import InputError
from datasteer.metagrad.metrics import Target
from datasteer.plugins import load_function


class CustomTargetSpec(TargetSpecBase):
    kind: Literal["custom"] = "custom"
    function: str = Field(..., description="package.module:function(model, params) -> 0-d tensor")

    readout = Readout(None)

    def check(self) -> None:
        load_function(self.function, "custom target")

    def build(self, model: torch.nn.Module, tokenizer: Any) -> CustomTarget:
        return custom(self.function)


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
