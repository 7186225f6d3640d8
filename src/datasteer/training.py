"""Glue to TRL's trainers, shared by fine-tuning (SFTTrainer) and DPG (GRPOTrainer).

- `LoraSpec`: peft's LoraConfig arguments, under peft's names, any other peft argument passed through;
- `trl_arguments`: datasteer's settings plus a recipe's `trl:` section (any other TRL config argument,
  checked against the TRL config class before a model loads);
- `check_report_to`, `trackers`, `tracker_folder`, `finish_trackers`: TRL's `report_to` (tensorboard, wandb,
  trackio, mlflow, ...) checked before a model loads, TensorBoard's events kept in the run directory, one tracker
  run per training;
- `latest_checkpoint`, `checkpoint_world_size`, `progress_callback`, `quiet_trainer`: resume and progress the same
  way everywhere (a checkpoint counts once its `trainer_state.json`, the last file the Trainer writes, reads back);
- `TrainingDivergedError`, `check_loss`, `check_parameters`, `divergence_callback`: a run whose loss, gradient
  or weights stop being finite (a learning rate far too high) stops with a one-line error naming the step,
  before anything downstream (a checkpoint, a published model, a profile) consumes NaN weights. Under
  torchrun/accelerate the weight check reads each process's own shard (FSDP, DeepSpeed ZeRO-3) and the processes
  agree on the verdict, so that all of them stop together rather than some waiting forever for the others.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field

from datasteer.config import StrictModel
from datasteer.distributed import active, all_gather_objects
from datasteer.errors import ConfigError, MissingDependencyError, TrainingDivergedError
from datasteer.models import first_nonfinite


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


# A mean token cross-entropy above this many nats is not learning: uniform guessing over a 250k vocabulary costs
# 12.4. Only the SFT loss is held to it (a policy-gradient loss has no such scale).
EXPLODED_LOSS = 1e3


def diverged(label: str, step: int, what: str, hint: str) -> TrainingDivergedError:
    """The one-line error for a run that diverged at `step` (`what`: the bad value, `hint`: the setting to lower)."""
    return TrainingDivergedError(f"{label} diverged at step {step}: {what}; the learning rate is probably too high, "
                                 f"lower it ({hint}) and run again")


def check_loss(value: Any, label: str, step: int, hint: str, limit: float | None = None,
               name: str = "the loss") -> None:
    """A non-finite `value` (or one above `limit`) is a TrainingDivergedError; reads the value only."""
    if value is None:
        return
    value = float(value)
    if not math.isfinite(value):
        raise diverged(label, step, f"{name} is {value}", hint)
    if limit is not None and value > limit:
        raise diverged(label, step, f"{name} exploded to {value:.4g}", hint)


def _local_part(tensor: Any) -> Any:
    """What this process holds of a parameter: an FSDP2 DTensor's local shard, a DeepSpeed ZeRO-3 partition, or the
    tensor itself."""
    if hasattr(tensor, "to_local"):
        return tensor.to_local()
    return getattr(tensor, "ds_tensor", tensor)


def check_parameters(named: Iterable[tuple[str, Any]], label: str, step: int, hint: str, *,
                     across_ranks: bool = False) -> None:
    """Weights with a NaN or an infinity are a TrainingDivergedError naming the step and the first bad tensor.
    `across_ranks` (code that runs on every process of a launch, such as a Trainer's callbacks): each process checks
    the part it holds and all of them raise, or none; a collective, so every process must call it at that point."""
    bad = first_nonfinite((name, _local_part(t)) for name, t in named)
    if across_ranks and active():
        bad = next((b for b in all_gather_objects(bad) if b is not None), None)
    if bad is not None:
        raise diverged(label, step, f"parameter {bad} holds NaN or infinite values", hint)


def divergence_callback(label: str, hint: str, loss_limit: float | None = None) -> Any:
    """A TrainerCallback that stops training with a TrainingDivergedError: a non-finite (or above `loss_limit`)
    logged loss or gradient norm at every log, non-finite trainable weights before every checkpoint and after the
    last step. It reads values only. Needs `logging_nan_inf_filter=False` (else transformers logs a NaN loss as
    the window's mean) and logging every step to name the step exactly. Under torchrun/accelerate every process
    runs it: the logged values are already averaged over processes, and the weight check agrees across them."""
    from transformers import TrainerCallback

    class Divergence(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            check_loss(logs.get("loss"), label, state.global_step, hint, loss_limit)
            check_loss(logs.get("grad_norm"), label, state.global_step, hint, name="the gradient norm")

        def on_step_end(self, args, state, control, model=None, **kwargs):
            # before the checkpoint of this step is written, and before the final model is saved
            if model is not None and (control.should_save or control.should_training_stop
                                      or state.global_step >= state.max_steps):
                check_parameters(((n, p) for n, p in model.named_parameters() if p.requires_grad), label,
                                 state.global_step, hint, across_ranks=True)

    return Divergence()


def _readable_state(checkpoint: Path) -> bool:
    """Whether `trainer_state.json` is there and whole: the Trainer writes it last (not atomically), after the
    weights, optimizer, scheduler and RNG states."""
    try:
        return isinstance(json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete `checkpoint-N` of a Trainer's output directory (None: nothing to resume). A checkpoint
    cut off by a kill (no readable trainer_state.json) is passed over: the Trainer deletes the previous one only
    after writing that file, so the previous one is still there."""
    found = [(int(p.name.split("-")[-1]), p) for p in Path(folder).glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and _readable_state(p)]
    return max(found)[1] if found else None


_RNG_FILE = re.compile(r"rng_state_(\d+)\.pth")


def checkpoint_world_size(checkpoint: Path) -> int | None:
    """How many processes wrote a Trainer checkpoint, from its RNG files (`rng_state.pth` in one process,
    `rng_state_<rank>.pth` per process under torchrun/accelerate); None when it holds none (save_only_model)."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "rng_state.pth").is_file():
        return 1
    ranks = [int(m.group(1)) for p in checkpoint.glob("rng_state_*.pth") if (m := _RNG_FILE.fullmatch(p.name))]
    return max(ranks) + 1 if ranks else None


def whole_checkpoints(trainer: Any) -> None:
    """Make a checkpoint count only once every process has written its part. The Trainer has each process save its
    RNG state, then the main process writes trainer_state.json (what marks a checkpoint complete) and deletes the
    older checkpoint, with no barrier in between: a kill there could leave the only checkpoint without another
    process's RNG state. All processes now wait after saving theirs."""
    save_rng = getattr(trainer, "_save_rng_state", None)
    if save_rng is None or trainer.args.world_size <= 1:
        return

    def save_rng_then_wait(output_dir: str) -> None:
        save_rng(output_dir)
        trainer.accelerator.wait_for_everyone()

    trainer._save_rng_state = save_rng_then_wait


# report_to names -> the module each tracker needs (transformers' integrations import them when training starts)
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "trackio": ("trackio",),
                   "mlflow": ("mlflow",), "comet_ml": ("comet_ml",), "neptune": ("neptune",), "clearml": ("clearml",),
                   "dvclive": ("dvclive",), "swanlab": ("swanlab",), "codecarbon": ("codecarbon",),
                   "azure_ml": ("azureml",), "dagshub": ("dagshub",), "flyte": ("flytekit",)}
TENSORBOARD_DIR = "tensorboard"


def trackers(report_to: Any) -> list[str]:
    """TRL's `report_to` as a list of tracker names ("none" and None: none; "all" stays "all")."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [] if names in ([], ["none"]) else names


def check_report_to(report_to: Any, section: str) -> None:
    """Before any model loads: every tracker named is one transformers integrates and is installed."""
    import importlib.util

    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = trackers(report_to)
    if "all" in names or "none" in names:
        if len(names) > 1:
            raise ConfigError(f"{section}: 'all' and 'none' stand alone; give them without other trackers")
        return
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(f"{section}: unknown tracker '{name}'; use none, all or one of "
                              f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
        modules = TRACKER_MODULES.get(name, ())
        if modules and not any(importlib.util.find_spec(m) is not None for m in modules):
            extra = "datasteer[trackers]" if name in ("tensorboard", "wandb") else modules[0]
            raise MissingDependencyError(f"{section}: the {name} tracker (package '{modules[0]}')",
                                         f"pip install '{extra}'")


def tracker_folder(trainer: Any, folder: Path) -> None:
    """TensorBoard writes into `folder` (the run's own, kept after checkpoints are deleted) unless the user chose a
    folder with TENSORBOARD_LOGGING_DIR; transformers' default is inside the Trainer's output_dir."""
    import os

    from transformers.integrations.integration_utils import TensorBoardCallback

    if os.environ.get("TENSORBOARD_LOGGING_DIR"):
        return
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(folder)


def finish_trackers(args: Any) -> None:
    """Close the wandb run a training opened: transformers leaves it open (for the user's own logging after
    `train`), but datasteer trains several models in one process (inherit's two students, DPG's arms) and each
    is a run of its own. The other trackers close their runs themselves at the end of training."""
    import sys

    wandb = sys.modules.get("wandb")
    if "wandb" in (getattr(args, "report_to", None) or []) and wandb is not None and wandb.run is not None:
        wandb.finish()


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
