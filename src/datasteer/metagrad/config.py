"""Configuration of the differentiable fine-tuning that the metagradient engine unrolls."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from datasteer.metagrad.optim import OPTIMIZERS

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """'2GB', '512MiB', 1e9 -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    match = _SIZE.match(value)
    unit = (match.group(2) or "").lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"'{value}' is not a size; write it like 512MB, 2GiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


class TrainingConfig(BaseModel):
    """How the target is fine-tuned inside `train` and `metagradients`.

    Batch loss = mean over the batch of w_i * loss_i, loss_i = mean next-token cross-entropy over
    example i's trained tokens. Optimizers follow torch.optim's update rules exactly (SGD with
    momentum/dampening/Nesterov, Adam with L2 weight decay, AdamW with decoupled weight decay);
    learning-rate schedules follow transformers' `get_scheduler` (constant, linear, cosine, with
    linear warm-up). Defaults are the DPG paper's inner loop: AdamW, betas (0.9, 0.95), eps 1e-8,
    weight decay 1e-4, constant learning rate, one epoch, 128 tokens.

    The DPG authors' code differs in three places, each available as an option (docs/dpg.md says why the
    defaults stay): `loss_normalization: max_length` (loss_i = summed token cross-entropy / max_length),
    `accumulation: sum` (the step's gradient is the sum of its micro-batches' mean gradients) and `eps_root`
    (optax's: Adam's denominator sqrt(v_hat + eps_root) + eps).
    """

    model_config = ConfigDict(extra="forbid")

    optimizer: str = Field("adamw", description=f"one of {', '.join(OPTIMIZERS)} (`metagrad.optim.OPTIMIZERS`)")
    learning_rate: float = Field(1e-4, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    dampening: float = Field(0.0, ge=0, le=1)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    eps_root: float = Field(0.0, ge=0, description="adam/adamw: added to the bias-corrected second moment inside "
                            "the square root, as optax's eps_root (the DPG authors: 1e-9); 0 = torch.optim's update")
    weight_decay: float | None = Field(None, ge=0, description="default: 1e-4 for adamw, 0 otherwise")
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(8, ge=1)
    micro_batch_size: int | None = Field(None, ge=1, description="gradient accumulation; default: batch_size")
    accumulation: Literal["mean", "sum"] = Field(
        "mean", description="mean: a step's loss is the batch mean of w_i * loss_i, however it is micro-batched; "
        "sum: the sum over micro-batches of each micro-batch's mean (the DPG authors' gradient accumulation: "
        "batch_size / micro_batch_size times the mean)")
    loss_normalization: Literal["trained_tokens", "max_length"] = Field(
        "trained_tokens", description="loss_i = summed token cross-entropy of example i divided by its number of "
        "trained tokens (trained_tokens) or by max_length (the DPG authors' full sequence length)")
    loss_chunk: int | None = Field(
        None, ge=1, description="tokens per chunk of the cross-entropy: the loss and both of its backward passes "
        "recompute the logits this many tokens at a time from the last hidden states and the (linear) LM head, so "
        "the memory floor of a reverse step no longer grows with batch x length x vocabulary; default: whole logits")
    epochs: int = Field(1, ge=1)
    shuffle: bool = True
    seed: int = 0
    max_length: int = Field(128, ge=2)
    dtype: Literal["float32", "float64"] = "float32"
    precision: Literal["fp32", "tf32", "bf16"] = Field(
        "fp32", description="fp32: every op in `dtype` (the exact reference); tf32: CUDA float32 matmuls and "
        "convolutions in TensorFloat-32; bf16: the model's forward passes (and the backward passes through them) "
        "under torch.autocast bfloat16 (the metric outside it). Parameters, optimizer state and the adjoint stay "
        "float32 either way; docs/dpg.md, 'Precision', says how far the scores move")
    device: str | None = Field(None, description="default: the device of the model's parameters")
    trainable: list[str] | None = Field(
        None, description="regular expressions (re.search) on parameter names to train; default: every parameter "
                          "that requires grad")
    checkpoint: Literal["auto", "all", "replay", "disk"] = "auto"
    replay_k: int | None = Field(None, ge=2, description="branching factor of the replay schedule")
    memory_budget: int | str | None = Field(
        None, description="bytes (or '2GB') that stored training states may use; picks the densest schedule")
    checkpoint_dir: str | None = Field(None, description="directory for checkpoint='disk' (default: a temp dir)")

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, value: str) -> str:
        if value not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer '{value}'; choose one of {', '.join(OPTIMIZERS)}")
        return value

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError("betas must lie in [0, 1)")
        return value

    @field_validator("trainable")
    @classmethod
    def _trainable(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or []:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"'{pattern}' is not a valid regular expression ({err}); write it as Python's re "
                                 "module reads it, e.g. 'lm_head' or 'layers\\.1\\.'") from None
        return value

    @field_validator("memory_budget")
    @classmethod
    def _budget(cls, value: int | str | None) -> int | None:
        return None if value is None else parse_bytes(value)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainingConfig":
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) exceeds batch_size ({self.batch_size})")
        if self.optimizer == "sgd" and self.eps_root:
            raise ValueError("eps_root applies to Adam's square root (optimizer 'adam' or 'adamw'), not to 'sgd'")
        if self.optimizer != "sgd" and (self.momentum or self.nesterov or self.dampening):
            raise ValueError("momentum, dampening and nesterov apply to optimizer 'sgd' only")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0 (as torch.optim.SGD)")
        if self.precision != "fp32" and self.dtype != "float32":
            raise ValueError(f"precision {self.precision} lowers float32 arithmetic; it needs dtype float32 "
                             f"(float64 is for checks, fp32 precision)")
        if self.precision != "fp32" and self.optimizer != "sgd":
            # d update / d g of Adam is about lr / (sqrt(v) + eps): rounding in a near-zero gradient is amplified up
            # to lr / eps (tests/test_metagrad.py: bf16 scores 1800x off the float64 ones with adamw, 1% with sgd)
            raise ValueError(f"precision {self.precision} with optimizer {self.optimizer}: Adam's update divides by "
                             f"sqrt(v) + eps, so the metagradient multiplies the rounding of near-zero gradients by "
                             f"up to lr / eps and the scores can be off by orders of magnitude; use precision fp32, "
                             f"or optimizer sgd")
        if self.checkpoint == "all" and self.memory_budget is not None:
            raise ValueError("memory_budget chooses the schedule; use checkpoint 'auto' or 'replay' with it")
        return self

    @property
    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 1e-4 if self.optimizer == "adamw" else 0.0

    @property
    def resolved_micro_batch_size(self) -> int:
        return self.micro_batch_size or self.batch_size
