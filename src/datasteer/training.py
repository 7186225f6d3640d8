"""Glue to TRL's trainers, shared by fine-tuning (SFTTrainer) and DPG (GRPOTrainer).

- `LoraSpec`: peft's LoraConfig arguments, under peft's names, any other peft argument passed through;
- `trl_arguments`: datasteer's settings plus a recipe's `trl:` section (any other TRL config argument,
  checked against the TRL config class before a model loads);
- `latest_checkpoint`, `progress_callback`, `quiet_trainer`: resume and progress the same way everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field

from datasteer.config import StrictModel
from datasteer.errors import ConfigError


class LoraSpec(StrictModel):
    """peft.LoraConfig arguments (peft's names); any other LoraConfig argument is passed through."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    r: int = Field(16, ge=1, description="adapter rank")
    lora_alpha: float = Field(32.0, gt=0, description="adapter scale numerator (scale = lora_alpha / r)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] | str = Field("all-linear", description="module names, or 'all-linear'")

    def peft_config(self, **overrides: Any) -> Any:
        from peft import LoraConfig

        try:
            return LoraConfig(task_type="CAUSAL_LM", **{**self.model_dump(), **overrides})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"lora: {str(err).splitlines()[0]}") from None


def trl_arguments(config_class: type, owned: dict[str, Any], extra: dict[str, Any], section: str) -> Any:
    """`config_class(**owned, **extra)`: `extra` is the recipe's pass-through section. A key datasteer sets
    itself, or one the TRL class does not have, is a one-line ConfigError naming the section."""
    known = {f.name for f in dataclasses.fields(config_class)}
    for key in extra:
        if key in owned:
            raise ConfigError(f"{section}.{key} is set by datasteer; set it in its own field instead")
        if key not in known:
            raise ConfigError(f"{section}.{key} is not an argument of trl.{config_class.__name__}")
    return config_class(**owned, **extra)


def check_trl_section(config_class_name: str, extra: dict[str, Any], section: str,
                      owned: Iterable[str] = ()) -> None:
    """Before any model loads: every key of a `trl:` section must be a field of the TRL config class, and none
    of those datasteer sets itself (`owned`)."""
    import trl

    config_class = getattr(trl, config_class_name)
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ConfigError(f"{section}: {', '.join(unknown)} not argument(s) of trl.{config_class_name}")
    taken = sorted(set(extra) & set(owned))
    if taken:
        raise ConfigError(f"{section}.{taken[0]} is set by datasteer; set it in its own field instead")


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete `checkpoint-N` of a Trainer's output directory (None: nothing to resume)."""
    found = [(int(p.name.split("-")[-1]), p) for p in Path(folder).glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def quiet_trainer(trainer: Any) -> None:
    """Drop transformers' printer callback (raw log dicts on stdout): datasteer's progress replaces it."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def progress_callback(tracker: Any, label: str) -> Any:
    """A TrainerCallback that advances a `progress.track` bar by optimizer steps and shows the loss."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # resumed steps count as done
            self.last = state.global_step
            tracker.set_total(state.max_steps, state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            tracker.advance(state.global_step - self.last)
            self.last = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                tracker.describe(f"{label} (loss {logs['loss']:.3f})")

    return Progress()
